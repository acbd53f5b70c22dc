"""A third task, for tests: which of two numbers is larger, from a vector of four. One module is all a new task
takes (plus a job script, `cliptime.cli.train_main("tests.toy_task:ToyTask", ...)`): the generic job shell,
sweeps, registry and prediction serve it unchanged. Its data are known (the label is x[0] > x[1]), so a trained
model must beat chance by far; each generation appends a line per block to `generate_log`, so tests can count
how often a job or sweep makes its data, and a file can hold a run at the start of an epoch."""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from cliptime.config import option
from cliptime.data.generated import from_generator
from cliptime.tasks.base import Task

LABELS = ("first", "second")


@dataclass(frozen=True)
class ToyConfig:
    data: str = option("", "Parquet shard directory (default: generate)")
    rows: int = option(128, "rows per block; train has 4 blocks, val and test 1 each")
    data_seed: int = option(0, "seed of the generated data")
    hidden: int = option(16, "hidden width")
    generate_log: str = option("", "a file that each generated block appends a line to")
    hold_file: str = option("", "a file naming an epoch: while it exists, training waits at that epoch and later ones")


def make_rows(block: int, *, seed: int, split: str, rows: int, log: str) -> dict[str, list]:
    if log:
        with open(log, "a") as f:
            f.write(f"{split} {block}\n")
    rng = np.random.default_rng([seed, ("train", "val", "test").index(split), block])
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    return {"x": [v.tobytes() for v in x], "label": [LABELS[int(a <= b)] for a, b, *_ in x]}


def wait_while_held(hold_file: str, epoch: int) -> None:
    """Wait while `hold_file` exists and names `epoch` or an earlier one (the test that holds the run replaces the
    file whole, never writes it in place, and may delete it at any time)."""
    while True:
        try:
            held_from = int(Path(hold_file).read_text())
        except FileNotFoundError:
            return
        if epoch < held_from:
            return
        time.sleep(0.1)


def decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "x": np.stack([np.frombuffer(b, dtype=np.float32) for b in batch["x"]]),
        "label": np.array([LABELS.index(s) for s in batch["label"]], dtype=np.int64),
    }


class ToyTask(Task):
    name = "toy"
    title = "Toy"
    summary = "Which of the first two of four numbers is larger. Input: `x`, four float32 as bytes. Output: `label`."
    Config = ToyConfig
    schema = pa.schema([("x", pa.binary()), ("label", pa.string())])
    label_column = "label"
    monitor = "val/accuracy"
    train_defaults = {"epochs": 3, "batch_size": 32, "lr": 1e-2, "cpus_per_worker": 1}
    generated_fields = ("rows", "data_seed", "generate_log")
    data_fields = ("data", *generated_fields)
    file_suffixes = ("npy",)

    def generate(self):
        c = self.cfg
        blocks = {"train": 4, "val": 1, "test": 1}
        return {
            split: from_generator(
                make_rows,
                "block",
                list(range(n)),
                self.schema,
                seed=c.data_seed,
                split=split,
                rows=c.rows,
                log=c.generate_log,
            )
            for split, n in blocks.items()
        }

    def preprocessor(self):
        return decode

    def build_model(self, load_pretrained: bool = True) -> nn.Module:
        return nn.Sequential(nn.Linear(4, self.cfg.hidden), nn.ReLU(), nn.Linear(self.cfg.hidden, len(LABELS)))

    def loss(self, model, batch, epoch=None, epochs=None):
        if self.cfg.hold_file:
            wait_while_held(self.cfg.hold_file, epoch)
        ce = F.cross_entropy(model(batch["x"]), batch["label"])
        return ce, {"ce": ce}

    @torch.no_grad()
    def evaluate(self, model, batches):
        model.eval()
        logits, labels = zip(*((model(b["x"]), b["label"]) for b in batches))
        logits, labels = torch.cat(logits), torch.cat(labels)
        accuracy = float((logits.argmax(-1) == labels).float().mean())
        return {"accuracy": accuracy, "ce": float(F.cross_entropy(logits, labels))}, {}

    def input_example(self) -> pd.DataFrame:
        return pd.DataFrame({"x": [np.zeros(4, dtype=np.float32).tobytes()]})

    @torch.no_grad()
    def predict(self, model, inputs: pd.DataFrame) -> pd.DataFrame:
        model.eval()
        x = torch.from_numpy(np.stack([np.frombuffer(bytes(b), dtype=np.float32) for b in inputs["x"]]))
        return pd.DataFrame({"label": [LABELS[i] for i in model(x).argmax(-1).tolist()]})

    def prediction_rows(self, data: bytes, args: argparse.Namespace) -> pd.DataFrame:
        return pd.DataFrame({"x": [np.load(io.BytesIO(data)).astype(np.float32).tobytes()]})

    def prediction_result(self, predictions: pd.DataFrame, args: argparse.Namespace) -> dict[str, Any]:
        return {"label": predictions["label"].iloc[0]}
