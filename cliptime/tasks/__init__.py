"""The tasks plugged into the generic train/tune/registry path, by name."""

from __future__ import annotations

from typing import Any

from cliptime.config import from_dict
from cliptime.errors import CliptimeError
from cliptime.tasks.audio_order import AudioOrderTask
from cliptime.tasks.base import Task
from cliptime.tasks.fungal import FungalTask

TASKS: dict[str, type[Task]] = {FungalTask.name: FungalTask, AudioOrderTask.name: AudioOrderTask}


def make_task(name: str, config: dict[str, Any] | None = None) -> Task:
    """The task `name` with its config built from a plain dict (defaults for missing keys)."""
    if name not in TASKS:
        raise CliptimeError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    cls = TASKS[name]
    return cls(from_dict(cls.Config, config or {}))
