"""Every setting is documented in the README, with its current default and meaning."""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings
from scripts.settings_table import BEGIN, render

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_settings_table_is_current() -> None:
    text = README.read_text()
    assert BEGIN in text
    assert render(text) == text, "run: python -m scripts.settings_table --write README.md"


def test_every_setting_has_a_description() -> None:
    missing = [name for name, f in Settings.model_fields.items() if not f.description]
    assert not missing
