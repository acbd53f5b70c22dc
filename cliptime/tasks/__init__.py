"""The tasks plugged into the generic train/tune/registry path, each by its one name.

A task outside this package (a plugin, a test's toy task) is named by its import path, `package.module:Class`;
Ray workers rebuild tasks from `task_ref(task)`, so such a task trains like the built-in ones.
"""

from __future__ import annotations

import importlib
from typing import Any

from cliptime.config import from_dict
from cliptime.errors import CliptimeError
from cliptime.tasks.base import Task
from cliptime.tasks.cliptime import CLIPTimeTask
from cliptime.tasks.tclap import TCLAPTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (CLIPTimeTask, TCLAPTask)}
ALIASES: dict[str, str] = {alias: cls.name for cls in TASKS.values() for alias in cls.aliases}


def task_class(name: str) -> type[Task]:
    """The task class called `name`: a task's name or alias, or an import path `package.module:Class`."""
    name = ALIASES.get(name, name)
    if name in TASKS:
        return TASKS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise CliptimeError(f"task {name!r} cannot be imported ({e})") from None
        if isinstance(cls, type) and issubclass(cls, Task):
            return cls
    raise CliptimeError(f"unknown task {name!r} (known: {', '.join(TASKS)})")


def task_ref(task: Task | type[Task]) -> str:
    """What names `task`'s class anywhere: its name if it is listed in TASKS, else its import path."""
    cls = task if isinstance(task, type) else type(task)
    return cls.name if TASKS.get(cls.name) is cls else f"{cls.__module__}:{cls.__qualname__}"


def make_task(name: str, config: dict[str, Any] | None = None) -> Task:
    """The task `name` with its config built from a plain dict (defaults for missing keys)."""
    cls = task_class(name)
    return cls(from_dict(cls.Config, config or {}))
