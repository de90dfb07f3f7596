"""Print (or write into README.md) the table of every REASONQ_* setting and its default.

``python -m scripts.settings_table --write README.md`` replaces the text between the
``<!-- settings -->`` markers; ``tests/test_settings_documented.py`` keeps it current.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic.fields import FieldInfo

from core.settings import Settings

BEGIN, END = "<!-- settings -->", "<!-- /settings -->"


def _default(name: str, field: FieldInfo) -> str:
    if name == "data_dir":
        return "`~/.local/share/reasonq`"
    if name == "profiles_file":
        return "`config/profiles.toml`"
    value = field.default
    if value is None:
        return "unset"
    text = json.dumps(value) if isinstance(value, (dict, list, bool)) else str(value)
    return f"`{text}`"


def table() -> str:
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        rows.append(
            f"| `REASONQ_{name.upper()}` | {_default(name, field)} | {field.description} |"
        )
    return "\n".join(rows)


def render(readme: str) -> str:
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--write"]:
        path = Path(argv[1])
        path.write_text(render(path.read_text()))
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
