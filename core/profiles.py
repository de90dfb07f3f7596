"""Task profiles: per task type, a system prompt and default sampling, read from a TOML file."""

from __future__ import annotations

import tomllib
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class TaskProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    system_prompt: str = ""
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)


@lru_cache
def load_profiles(path: Path) -> dict[str, TaskProfile]:
    """Profiles by task type; a malformed file fails loudly at start, not per job."""
    with path.open("rb") as f:
        raw = tomllib.load(f)
    return {name: TaskProfile.model_validate(table) for name, table in raw.items()}
