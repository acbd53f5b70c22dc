"""The task interface: what a model family plugs into the one Ray Train / Tune / MLflow path.

A task owns everything about its model family: its data (generator, converters from users' files, shard schema,
decode), its model, loss and evaluation, and its prediction I/O. The generic modules (`cliptime.job`,
`cliptime.train`, `cliptime.tune`, `cliptime.cli`, ...) own the loop, checkpoints, resume, DDP, reporting, MLflow
and the registry, and name no task. A new task is one module with one `Task` subclass, listed in
`cliptime.tasks.TASKS` (or named by its import path, `package.module:Class`), plus a short job script.

A task is a value: it is built from its config alone, and no method changes it. What the data decide (class
names, time range) is resolved once, on the driver, into a new task (`resolved`), so a task rebuilt anywhere
from its config (a Ray worker, a sweep trial, a registered model) is the same task.
"""

from __future__ import annotations

import argparse
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import ray.data
import torch
from torch import nn

from cliptime.config import TrainConfig, check_not_negative, from_dict

Batch = dict[str, torch.Tensor]
NumpyBatch = dict[str, np.ndarray]


def tokenize_distinct(tokenize: Callable[[list[str]], torch.Tensor], texts: Iterable) -> np.ndarray:
    """Token ids of `texts` (one row each), each distinct text tokenized once: captions made from templates repeat
    many times in a decode batch (9 distinct in 64 generated CLIPTime rows), and tokenizing each row was 0.030 ms
    of a 224-px image's 0.48 ms of decoding, 0.005 ms this way
    (benchmarks/results/ingest-2026-12-07-distinct-captions.md)."""
    distinct, row_of = np.unique(np.array([str(t) for t in texts], dtype=object), return_inverse=True)
    return tokenize(list(distinct)).numpy()[row_of.reshape(-1)]


@dataclass(frozen=True)
class Converter:
    """A reader of one format of users' own data into a task's shard rows (`make_shards.py KIND IN OUT`)."""

    Config: type  # the converter's dataclass config (its flags)
    metavar: str  # the input's name in --help, e.g. PHOTOS_DIR
    help: str
    # (input: a local path or a URI, config, scratch dir beside the output, skip bad inputs)
    #   -> (datasets per split, source, skipped)
    convert: Callable[[str | Path, Any, Path, bool], tuple[dict[str, ray.data.Dataset], dict, list[str]]]
    # On the task's converter of WebDataset tar shards: its settings from the task's config, with which `--data`
    # naming such shards directly is converted (once; cliptime.convert.shard_folder).
    webdataset: Callable[[Any], Any] | None = None


class Task(ABC):
    # The task's one name: its key, its module under cliptime/tasks/, its registered MLflow model, its
    # `make_shards.py` subcommand for the generated data, and its job script `jobs/train_<name>.py`.
    name: ClassVar[str]
    title: ClassVar[str]  # how people write it, e.g. "T-CLAP"
    # What the model does, what it takes and what it answers, in a few sentences of Markdown: the registered
    # model's description in MLflow opens with it (cliptime.registry.model_description).
    summary: ClassVar[str] = "A model of this task; it takes and answers the pyfunc columns named below."
    aliases: ClassVar[tuple[str, ...]] = ()  # older spellings that users already type
    Config: ClassVar[type]  # the task's frozen dataclass config
    schema: ClassVar[pa.Schema]  # columns and types of the task's Parquet shards
    label_column: ClassVar[str]  # counted per split in shard manifests
    monitor: ClassVar[str]  # the validation metric that says how good a model is (higher is better)
    train_defaults: ClassVar[dict] = {}  # TrainConfig settings sized for this task's tiny CPU config
    # settings of the task's data generator: `make_shards.py TASK OUT` offers these flags alone
    generated_fields: ClassVar[tuple[str, ...]] = ()
    # settings that decide the prepared (decoded) data: a sweep prepares one data set per combination of them
    data_fields: ClassVar[tuple[str, ...]] = ("data",)
    # how the generator encodes its items: part of the generated data's test fingerprint, as a new encoding makes
    # new test data from the same settings
    data_format: ClassVar[str] = ""
    converters: ClassVar[dict[str, Converter]] = {}  # make_shards subcommand -> reader of users' files
    # The tiny preset of tests and smoke runs: the data-size settings at the least each may shrink to (benchmarks
    # scale the data by them), and the smallest other settings (model widths, image size) that still train.
    data_sizes: ClassVar[dict[str, int]] = {}
    tiny_model: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: Any):
        check_not_negative(cfg)  # sizes, counts, weights: never negative, whatever the task
        self.cfg = cfg

    @classmethod
    def train_config(cls, **overrides: Any) -> TrainConfig:
        """The training settings of this task: `TrainConfig` defaults, the task's presets, then `overrides`.
        Jobs, sweeps, benchmarks and tests all start here."""
        return from_dict(TrainConfig, {**cls.train_defaults, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> Task:
        """The task at its tiny preset (seconds per epoch on a CPU), with `overrides`."""
        return cls(cls.Config(**{**cls.data_sizes, **cls.tiny_model, **overrides}))

    def replace(self, **changes: Any) -> Task:
        """This task with some settings changed (a new value; this one stays as it is)."""
        return type(self)(dataclasses.replace(self.cfg, **changes))

    # -- data ----------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Validate the config before anything starts (raise CliptimeError naming the bad setting)."""

    @abstractmethod
    def generate(self) -> dict[str, ray.data.Dataset]:
        """The task's procedurally generated data set, one lazy dataset of shard-schema rows per split."""

    def source(self) -> dict:
        """How the generated data set is made (generator settings), recorded in shard manifests."""
        return {}

    def resolved(self, manifest: dict) -> Task:
        """This task with what the shards' manifest decides (class names, time range) in its config.

        Rejects shards made for another configuration (sample rate, clip length, ...) naming the setting."""
        return self

    @abstractmethod
    def preprocessor(self) -> Callable[[NumpyBatch], NumpyBatch]:
        """A picklable `map_batches` function: shard rows -> model-ready arrays (decode, tokenize, labels).

        Deterministic: it runs once per data set in Ray Data, not in the training step."""

    def train_transform(self, batch: Batch) -> Batch:
        """Random augmentation of a training batch on the worker's device, just before the loss. All of a task's
        augmentation lives here: a few tensor operations per sample cost the device little, while the same work in
        Ray Data each epoch took most of a CPU's time per item (benchmarks/ingest.py)."""
        return batch

    # -- model and loss ------------------------------------------------------------------------------------
    @abstractmethod
    def build_model(self, load_pretrained: bool = True) -> nn.Module:
        """The model; `load_pretrained=False` skips pretrained weights that a checkpoint will replace."""

    @abstractmethod
    def loss(
        self, model: nn.Module, batch: Batch, epoch: int | None = None, epochs: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, named parts to log) for one batch on the worker's device.

        `epoch` (0-based) of `epochs`: where the run stands, for a loss that changes over the run (a pure
        function of the two). Without them (tests, benchmarks) the loss is the full one."""

    # -- evaluation ----------------------------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> tuple[dict[str, float], dict[str, Any]]:
        """(metrics, outputs) over held-out batches; outputs are the arrays the figures are drawn from.

        Metrics in the order they should be read, the headline first: `validate` keeps it, and the epoch line lists
        them so."""

    def validate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        """The metrics of each epoch's validation, which sweeps rank trials by and ASHA stops them on: the
        test's by default. A task whose test adds controls that cost model passes but judge nothing during
        training leaves them to the test, where they are measured once instead of every epoch."""
        return self.evaluate(model, batches)[0]

    def figures(self, outputs: dict[str, Any], baseline: dict[str, Any] | None = None) -> dict[str, Any]:
        """Named matplotlib figures for MLflow (`baseline`: the baseline model's outputs, if one was trained)."""
        return {}

    def baseline(self) -> Task | None:
        """A baseline to train on the same data and budget and report beside this task's model, or None."""
        return None

    # -- prediction ----------------------------------------------------------------------------------------
    @abstractmethod
    def input_example(self) -> Any:
        """A small pyfunc input (a pandas DataFrame) used for the MLflow signature and a smoke prediction."""

    @abstractmethod
    def predict(self, model: nn.Module, inputs: Any) -> Any:
        """pyfunc prediction: a DataFrame of inputs -> a DataFrame of outputs."""

    # `jobs/predict.py MODEL FILE_OR_FOLDER`: a file becomes rows of model inputs, their predictions one JSON
    # object; a folder's files (those with `file_suffixes`) become one table of predictions with their paths.
    file_suffixes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def add_predict_args(cls, group: argparse._ArgumentGroup) -> None:
        """The task's own flags of `jobs/predict.py` (besides the model URI and the input path)."""

    def prediction_rows(self, data: bytes, args: argparse.Namespace) -> Any:
        """The pyfunc input rows (a DataFrame) for one input file's bytes, given the task's predict flags."""
        raise NotImplementedError

    def prediction_result(self, predictions: Any, args: argparse.Namespace) -> dict[str, Any]:
        """The JSON answer for one input file, from the predictions of its `prediction_rows`."""
        raise NotImplementedError

    def folder_summary(self, table: Any) -> dict[str, Any]:
        """What the JSON line says of a folder's table of predictions."""
        return {"files": int(table["path"].nunique())}
