"""The task interface: what a model family plugs into the one Ray Train / Tune / MLflow path.

A task owns its data (generator, shard schema, decode), its model, its loss and its evaluation; `cliptime.train`
owns the loop, checkpoints, resume, DDP, reporting, MLflow logging and registration. A new task is one new
module with one `Task` subclass, registered in `cliptime.tasks.TASKS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import ray.data
import torch
from torch import nn

Batch = dict[str, torch.Tensor]
NumpyBatch = dict[str, np.ndarray]


class Task(ABC):
    name: ClassVar[str]  # CLI and manifest name, e.g. "cliptime"
    registered_model: ClassVar[str]  # MLflow registered model name, e.g. "cliptime-fungal"
    Config: ClassVar[type]  # the task's dataclass config
    schema: ClassVar[pa.Schema]  # columns and types of the task's Parquet shards
    label_column: ClassVar[str]  # counted per split in shard manifests
    monitor: ClassVar[str]  # the validation metric that says how good a model is (higher is better)
    train_defaults: ClassVar[dict] = {}  # TrainConfig defaults sized for this task's tiny CPU config

    def __init__(self, cfg: Any):
        self.cfg = cfg

    # -- data ----------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Validate the config before anything starts (raise CliptimeError naming the bad setting)."""

    @abstractmethod
    def generate(self) -> dict[str, ray.data.Dataset]:
        """The task's procedurally generated data set, one lazy dataset of shard-schema rows per split."""

    def source(self) -> dict:
        """How the generated data set is made (generator settings), recorded in shard manifests."""
        return {}

    def check_manifest(self, manifest: dict) -> None:
        """Reject shards made for another configuration (sample rate, clip length, ...)."""

    @abstractmethod
    def preprocessor(self) -> Callable[[NumpyBatch], NumpyBatch]:
        """A picklable `map_batches` function: shard rows -> model-ready arrays (decode, tokenize, labels).

        Deterministic: it runs once per data set in Ray Data, not in the training step."""

    def augmenter(self) -> Callable[[NumpyBatch], NumpyBatch] | None:
        """A picklable `map_batches` function for random training augmentation, run each epoch; it should
        live in a module that imports numpy only (see cliptime.data.augment)."""
        return None

    def train_transform(self, batch: Batch) -> Batch:
        """Random augmentation of a training batch on the worker's device, just before the loss.

        For transforms costing a few operations per sample (a gain, a mask): as a Ray Data stage they would cost
        more in moving data than in work. Measured on T-CLAP's per-clip gain on 2 CPU cores: a `map_batches`
        stage (an extra pass of every epoch's 166 MB of audio through the object store) held the Ray path at
        0.85-0.89 of the step-only speed, waiting for data 3.5-4% of the time; on the device: 0.99, 0.5%."""
        return batch

    # -- model and loss ------------------------------------------------------------------------------------
    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the training loop before each epoch (0-based, of `epochs`): for a loss that changes over
        the run. Outside the loop (tests, benchmarks) it is never called and the loss is the full one."""

    @abstractmethod
    def build_model(self, load_pretrained: bool = True) -> nn.Module:
        """The model; `load_pretrained=False` skips pretrained weights that a checkpoint will replace."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, named parts to log) for one batch on the worker's device."""

    # -- evaluation ----------------------------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> tuple[dict[str, float], dict[str, Any]]:
        """(metrics, outputs) over held-out batches; outputs are the arrays the figures are drawn from."""

    def figures(self, outputs: dict[str, Any], baseline: dict[str, Any] | None = None) -> dict[str, Any]:
        """Named matplotlib figures for MLflow (`baseline`: the baseline model's outputs, if one was trained)."""
        return {}

    def baseline(self) -> Task | None:
        """A baseline to train on the same data and budget and report beside this task's model, or None."""
        return None

    # -- serving -------------------------------------------------------------------------------------------
    @abstractmethod
    def input_example(self) -> Any:
        """A small pyfunc input (a pandas DataFrame) used for the MLflow signature and a smoke prediction."""

    @abstractmethod
    def predict(self, model: nn.Module, inputs: Any) -> Any:
        """pyfunc prediction: a DataFrame of inputs -> a DataFrame of outputs."""
