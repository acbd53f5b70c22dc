"""Prediction from any registered model URI (`models:/cliptime@champion`, `models:/tclap/3`, `runs:/...`).

The model is loaded once, from the version's plain files (no code from the registry runs); its task turns an
input file into model inputs and the predictions into the answer.
A folder's files are predicted in batches by Ray Data actors, each loading the model once, into one table.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cliptime.data.user_files import visible_files
from cliptime.errors import CliptimeError
from cliptime.registry import load_model
from cliptime.runtime import init_ray
from cliptime.tasks.base import Task
from cliptime.tracking import tracking_uri


def load(uri: str, tracking: str = "") -> tuple[Task, torch.nn.Module]:
    """(task, model) of a model URI in the tracking store (`tracking`, default: this process's), built from its
    plain files (see cliptime.registry)."""
    import mlflow

    mlflow.set_tracking_uri(tracking or tracking_uri())
    return load_model(uri)


class _FolderPredictor:
    """Ray Data actor: the model loaded once, predicting batches of files."""

    def __init__(self, uri: str, tracking: str, args: argparse.Namespace):
        # The driver's tracking store, named explicitly: an actor's environment may not be the driver's.
        self.task, self.model = load(uri, tracking)
        self.args = args

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = [self.task.prediction_rows(bytes(data), self.args) for data in batch["bytes"]]
        out = self.task.predict(self.model, pd.concat(rows, ignore_index=True))
        out.insert(0, "path", [p for p, r in zip(batch["path"], rows) for _ in range(len(r))])
        return out


def predict(uri: str, task: Task, model: torch.nn.Module, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The JSON answer for one input file, or for a folder (its table written to `args.out`)."""
    if path.is_file():
        predictions = task.predict(model, task.prediction_rows(path.read_bytes(), args))
        return {"path": str(path), **task.prediction_result(predictions, args)}
    import ray.data

    files = visible_files(path, {f".{s}" for s in task.file_suffixes})
    if not files:
        raise CliptimeError(f"{path} holds no {task.title} input files ({', '.join(task.file_suffixes)})")
    init_ray()
    table = (
        ray.data.read_binary_files([str(f) for f in files], include_paths=True)
        .map_batches(
            _FolderPredictor,
            fn_constructor_kwargs={"uri": uri, "tracking": tracking_uri(), "args": args},
            batch_format="pandas",
            batch_size=64,
            concurrency=1,
        )
        .to_pandas()
    )
    out = Path(args.out or "predictions.parquet")
    if out.suffix == ".csv":
        table.to_csv(out, index=False)
    else:
        table.to_parquet(out, index=False)
    return {**task.folder_summary(table), "written": str(out)}
