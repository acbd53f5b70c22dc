"""Data sets -> a task's Parquet shards: its generated set, or the user's own files through one of its converters.

The converters themselves live with their tasks (`Task.converters`); this module gives them a scratch directory
beside the output and writes the result atomically.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from cliptime.data.shards import check_output, write_shards
from cliptime.runtime import init_ray
from cliptime.tasks.base import Task


def write_generated_shards(task: Task, out_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """The task's generated data set as shards at `out_dir`; returns the JSON line."""
    task.check()
    check_output(out_dir, overwrite)  # before any work (write_shards checks again)
    init_ray()
    manifest = write_shards(
        task.generate(), out_dir, task=task.name, label=task.label_column, source=task.source(), overwrite=overwrite
    )
    return {"out_dir": str(out_dir), "manifest": manifest}


def write_user_shards(
    task_cls: type[Task],
    kind: str,
    input_dir: str | Path,
    out_dir: str | Path,
    cfg: Any,
    *,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert `input_dir` with the task's converter `kind` into shards at `out_dir`; returns the manifest and
    what was skipped."""
    out = check_output(out_dir, overwrite)  # before any work (write_shards checks again)
    out.parent.mkdir(parents=True, exist_ok=True)
    init_ray()
    # The scratch copy sits beside the output: the same file system, with room for a large collection.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.scratch-", dir=out.parent) as scratch:
        datasets, source, skipped = task_cls.converters[kind].convert(Path(input_dir), cfg, Path(scratch), skip_bad)
        manifest = write_shards(
            datasets, out, task=task_cls.name, label=task_cls.label_column, source=source, overwrite=overwrite
        )
    return {"out_dir": str(out), "manifest": manifest, "skipped": skipped}
