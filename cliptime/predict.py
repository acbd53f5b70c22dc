"""Prediction from any registered model URI (`models:/cliptime-fungal@champion`, `models:/tclap/3`, `runs:/...`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from cliptime.errors import CliptimeError
from cliptime.tracking import TaskModel, tracking_uri

IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "tif", "tiff", "bmp", "webp")


def load(uri: str):
    """(pyfunc model, its task) for a cliptime model URI."""
    mlflow.set_tracking_uri(tracking_uri())
    try:
        model = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as e:
        raise CliptimeError(f"cannot load model {uri}: {str(e).splitlines()[0]}") from None
    inner = model.unwrap_python_model()
    if not isinstance(inner, TaskModel):
        raise CliptimeError(f"{uri} is not a cliptime model")
    return model, inner.task


class _FolderPredictor:
    """Ray Data actor: the model loaded once, predicting batches of image files."""

    def __init__(self, uri: str, caption: str):
        self.model, _ = load(uri)
        self.caption = caption

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = self.model.predict(pd.DataFrame({"image": list(batch["bytes"]), "caption": self.caption}))
        out.insert(0, "path", list(batch["path"]))
        return out


def predict_cliptime(uri: str, path: Path, caption: str, out: Path | None) -> dict[str, Any]:
    model, _ = load(uri)
    if path.is_file():
        row = model.predict(pd.DataFrame({"image": [path.read_bytes()], "caption": [caption]})).iloc[0]
        return {"path": str(path), **row.to_dict()}
    import ray.data

    from cliptime.train import init_ray

    files = [p for p in path.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_SUFFIXES]
    if not files:
        raise CliptimeError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    init_ray()
    images = ray.data.read_binary_files([str(f) for f in files], include_paths=True)
    predictions = images.map_batches(
        _FolderPredictor,
        fn_constructor_kwargs={"uri": uri, "caption": caption},
        batch_format="pandas",
        batch_size=64,
        concurrency=1,
    ).to_pandas()
    out = out or Path("predictions.parquet")
    if out.suffix == ".csv":
        predictions.to_csv(out, index=False)
    else:
        predictions.to_parquet(out, index=False)
    counts = predictions["stage"].value_counts().to_dict()
    return {"images": len(predictions), "stages": counts, "written": str(out)}


def predict_tclap(uri: str, path: Path, captions: list[str], order: list[str] | None) -> dict[str, Any]:
    from cliptime.data.sound_events import ORDER_TEMPLATES

    model, _ = load(uri)
    if not path.is_file():
        raise CliptimeError(f"{path} is not a file (T-CLAP predicts one audio file at a time)")
    if order:
        template = ORDER_TEMPLATES["basic"][0]
        captions = [template.format(first=order[0], second=order[1]), template.format(first=order[1], second=order[0])]
    if not captions:
        raise CliptimeError("give candidate captions with --captions, or two events with --order A B")
    audio = path.read_bytes()
    scores = model.predict(pd.DataFrame({"audio": [audio] * len(captions), "caption": captions}))
    ranked = scores.sort_values("score", ascending=False).to_dict("records")
    result: dict[str, Any] = {"path": str(path), "ranking": ranked}
    if order:
        first_wins = scores["score"][0] >= scores["score"][1]
        result["order"] = list(order) if first_wins else [order[1], order[0]]
    return result
