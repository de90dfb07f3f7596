"""``reasonq convert``: a Hugging Face folder or a GGUF file -> an onnxruntime-genai folder.

The engine is onnxruntime-genai's model builder (``onnxruntime_genai.models.builder``),
run as a subprocess so the torch copy of the weights is freed when it exits. The output
folder holds ``genai_config.json``, ``model.onnx`` (+ ``model.onnx.data``) and the
Hugging Face tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` with the chat
template, ``generation_config.json``), so both onnxruntime-genai and
``transformers.AutoTokenizer`` can read it.

A quantized GGUF (the builder only reads float GGUFs) is first dequantized by transformers
into a plain Hugging Face folder (:func:`gguf_to_hf`).

    reasonq convert ./Phi-4-mini-instruct -o ./phi4-mini-int4 --precision int4
    reasonq convert ./SmolLM2-135M-Instruct.Q4_1.gguf -o ./smollm2-fp32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.errors import ReasonqError

__all__ = ["ConversionError", "convert", "gguf_to_hf", "main"]

PRECISIONS = ("fp32", "fp16", "int4")
DEVICES = ("cpu", "cuda")
# Files the builder's tokenizer save may leave out that transformers or genai read.
_HF_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


class ConversionError(ReasonqError):
    """SRC is missing or not a model we can convert, or the builder failed."""

    code = "conversion_failed"


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a float32 Hugging Face folder (weights, tokenizer, config).

    ``from_pretrained(gguf_file=...)`` marks the model as quantized and so refuses
    ``save_pretrained``: the model is rebuilt from its config and the dequantized tensors
    loaded into it instead.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # gguf raises ValueError, KeyError, struct errors...
        raise ConversionError(
            f"{gguf_path}: not a GGUF model transformers can read ({exc})"
        ) from exc
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    result = model.load_state_dict(tensors["tensors"], strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(result.missing_keys) - tied:
        raise ConversionError(f"{gguf_path}: weights missing from the GGUF: {result.missing_keys}")
    model.tie_weights()
    eos = {config.eos_token_id} if isinstance(config.eos_token_id, int) else set()
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=sorted(eos) if len(eos) > 1 else next(iter(eos), None),
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else config.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _tidy_tokenizer_config(out_dir)
    return out_dir


def convert(
    src: str | Path,
    out: str | Path,
    precision: str = "fp32",
    device: str | None = None,
    gguf_file: str | None = None,
    max_length: int | None = None,
    overwrite: bool = False,
    hf_dir: Path | None = None,
) -> Path:
    """Convert ``src`` into an onnxruntime-genai folder at ``out``; returns ``out``.

    ``device`` defaults to cuda for fp16 (there is no fp16 CPU build) and cpu otherwise.
    A GGUF source is dequantized into ``hf_dir`` (a temporary folder when None). The
    model is built in ``<out>.partial`` and moved into place only when complete.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if precision not in PRECISIONS:
        raise ConversionError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    device = device or ("cuda" if precision == "fp16" else "cpu")
    if device not in DEVICES:
        raise ConversionError(f"device must be one of {DEVICES}, not {device!r}")
    if precision == "fp16" and device == "cpu":
        raise ConversionError("fp16 is a GPU format: use --device cuda (or fp32/int4 for CPU)")
    if max_length is not None and max_length < 1:
        raise ConversionError(f"--max-length must be positive, not {max_length}")
    if out.is_file():
        raise ConversionError(f"{out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out} exists and is not empty (pass --force to replace it)")
    gguf = _find_gguf(src, gguf_file)

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    # beside OUT, not in /tmp: a dequantized 4B model is 15 GB
    with tempfile.TemporaryDirectory(prefix=".reasonq-convert-", dir=out.parent) as tmp:
        try:
            if gguf is not None:
                hf_dir = Path(hf_dir) if hf_dir is not None else Path(tmp) / "hf"
                print(f"dequantizing {gguf} -> {hf_dir}", flush=True)
                gguf_to_hf(gguf, hf_dir)
                src = hf_dir
            _check_hf_folder(src)
            shutil.rmtree(partial, ignore_errors=True)
            _run_builder(src, partial, precision, device, Path(tmp) / "cache")
            _finish(src, partial, max_length)  # inside: a dequantized src lives in tmp
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


def _find_gguf(src: Path, gguf_file: str | None) -> Path | None:
    """The GGUF file ``src`` names, or None when ``src`` is a Hugging Face folder."""
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder")
    if src.is_file():
        if src.suffix != ".gguf":
            raise ConversionError(f"{src}: expected a Hugging Face folder or a .gguf file")
        if gguf_file is not None and gguf_file != src.name:
            raise ConversionError(f"--gguf-file {gguf_file} does not match SRC {src.name}")
        return src
    if gguf_file is not None:
        path = src / gguf_file
        if not path.is_file():
            raise ConversionError(f"{path}: no such GGUF file")
        return path
    if not (src / "config.json").is_file():
        ggufs = sorted(src.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        hint = f" (it holds {len(ggufs)} .gguf files: pick one with --gguf-file)" if ggufs else ""
        raise ConversionError(f"{src}: not a Hugging Face model folder: no config.json{hint}")
    return None


def _check_hf_folder(src: Path) -> None:
    try:
        config = json.loads((src / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{src}/config.json: unreadable ({exc})") from exc
    if not isinstance(config, dict) or not config.get("architectures"):
        raise ConversionError(f"{src}/config.json: no 'architectures' entry")
    weights = [*src.glob("*.safetensors"), *src.glob("*.bin")]
    if not weights:
        raise ConversionError(f"{src}: no weights (*.safetensors or *.bin)")
    if not (src / "tokenizer.json").is_file() and not (src / "tokenizer.model").is_file():
        raise ConversionError(f"{src}: no tokenizer (tokenizer.json or tokenizer.model)")


def _run_builder(src: Path, out: Path, precision: str, device: str, cache: Path) -> None:
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(src), "-o", str(out), "-p", precision, "-e", device, "-c", str(cache),
        "--extra_options", "hf_token=false",
    ]  # fmt: skip
    print(f"building {precision} {device} model: {' '.join(cmd)}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        cmd, check=False, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-25:])
        raise ConversionError(f"model builder failed (exit {proc.returncode}):\n{tail}")
    if not (out / "genai_config.json").is_file() or not (out / "model.onnx").is_file():
        raise ConversionError(f"model builder wrote no genai_config.json/model.onnx in {out}")


def _finish(src: Path, out: Path, max_length: int | None) -> None:
    """Copy the tokenizer side files the builder leaves out; apply ``max_length``."""
    for name in _HF_SIDE_FILES:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / name)
    _tidy_tokenizer_config(out)
    genai_path = out / "genai_config.json"
    genai = json.loads(genai_path.read_text())
    if max_length is not None:
        context = genai["model"].get("context_length", max_length)
        genai["search"]["max_length"] = min(max_length, context)
    genai_path.write_text(json.dumps(genai, indent=4) + "\n")


def _tidy_tokenizer_config(folder: Path) -> None:
    """Make ``tokenizer_config.json`` readable by onnxruntime-genai and older transformers.

    transformers 5 keeps the chat template in ``chat_template.jinja`` only, names the
    class ``TokenizersBackend`` (unknown before 5) and leaks its load-time flags.
    """
    config_file, template_file = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    if not config.get("chat_template") and template_file.is_file():
        config["chat_template"] = template_file.read_text()
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for leaked in ("is_local", "local_files_only"):
        config.pop(leaked, None)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="reasonq convert",
        description="Convert a Hugging Face folder or a GGUF file to an onnxruntime-genai folder.",
    )
    parser.add_argument("src", help="Hugging Face model folder, or a .gguf file")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument(
        "--device", choices=DEVICES, help="target device (default: cuda for fp16, else cpu)"
    )
    parser.add_argument("--gguf-file", help="the .gguf file to use inside a SRC folder")
    parser.add_argument("--max-length", type=int, help="default max_length in genai_config")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        out = convert(
            args.src, args.output, args.precision, args.device,
            gguf_file=args.gguf_file, max_length=args.max_length, overwrite=args.force,
        )  # fmt: skip
    except ConversionError as exc:
        print(f"reasonq convert: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({args.precision}) in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
