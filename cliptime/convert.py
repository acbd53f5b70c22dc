"""The user's own data -> a task's Parquet shards: time-lapse photo folders (CLIPTime), ESC-50-layout sound
collections (T-CLAP). The converters live in cliptime.data.timelapse and cliptime.data.esc50; this module gives
them the model's input format and the task's schema, and writes the result atomically."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from cliptime.errors import CliptimeError

CONVERTERS = {  # make_shards subcommand -> (task whose shards it writes, metavar, what it converts)
    "timelapse": ("cliptime", "PHOTOS_DIR", "a folder of time-lapse photos, one sub-folder per series"),
    "esc50": ("tclap", "ESC_DIR", "an ESC-50-layout sound collection (audio/*.wav, meta/esc50.csv)"),
}


def convert_config(kind: str) -> type:
    """The dataclass config of converter `kind` (timelapse or esc50)."""
    from cliptime.data import esc50, timelapse

    return {"timelapse": timelapse.TimelapseConfig, "esc50": esc50.ESC50Config}[kind]


def write_user_shards(
    kind: str, input_dir: str | Path, out_dir: str | Path, cfg: Any, *, skip_bad: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Convert `input_dir` with converter `kind` into shards at `out_dir`; returns the manifest and what was skipped."""
    from cliptime.data import esc50, timelapse
    from cliptime.data.shards import write_shards
    from cliptime.tasks import TASKS
    from cliptime.train import init_ray

    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not overwrite:  # before any work (write_shards checks again)
        raise CliptimeError(f"output directory {out} already exists (pass --overwrite to replace it)")
    task_cls = TASKS[CONVERTERS[kind][0]]
    out.parent.mkdir(parents=True, exist_ok=True)
    init_ray()
    # The scratch copy sits beside the output: the same file system, with room for a large collection.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.scratch-", dir=out.parent) as scratch_dir:
        scratch = Path(scratch_dir)
        if kind == "timelapse":
            from cliptime.models.open_clip_backbone import check_backbone, image_size

            check_backbone(cfg.model, "")
            size = cfg.image_size or image_size(cfg.model)[0]
            datasets, source, skipped = timelapse.convert(input_dir, cfg, size, task_cls.schema, scratch, skip_bad)
        else:
            from cliptime.models.clap import check_clap

            audio = check_clap(cfg.audio_model, "transformer")["audio_cfg"]
            datasets, source, skipped = esc50.convert(
                input_dir, cfg, audio["sample_rate"], audio["clip_samples"], task_cls.schema, scratch, skip_bad
            )
        manifest = write_shards(
            datasets, out, task=task_cls.name, label=task_cls.label_column, source=source, overwrite=overwrite
        )
    return {"out_dir": str(out), "manifest": manifest, "skipped": skipped}
