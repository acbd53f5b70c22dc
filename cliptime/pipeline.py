"""From a task's data to what its training workers read: prepared once, viewed per run.

    shards (checked, verified as read) or the task's generator -> decode once (map_batches, materialized)
                                                                                         = PreparedData
      -> per run: the train split in a seeded block order                               = training_datasets

A sweep prepares its data once on the driver and hands the prepared splits to every trial; each trial only adds
its own shuffling, which is lazy. Random augmentation runs on the training device (`Task.train_transform`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa
import ray.data
import ray.exceptions

from cliptime.convert import shard_folder
from cliptime.data.shards import file_system, name_damaged_shard, open_shards, parquet_files
from cliptime.errors import CliptimeError, find_cause
from cliptime.tasks.base import Task

DECODE_BATCH = 64  # rows per decode call; blocks of this size are also the unit of the per-epoch block shuffle


@dataclass
class PreparedData:
    task: Task  # resolved against the data (class names, time range from the shards' manifest)
    splits: dict[str, ray.data.Dataset]  # model-ready arrays per split, materialized in the object store
    rows: dict[str, int]
    test_fingerprint: str  # names the test split's content: models scored on equal fingerprints are comparable


def test_fingerprint(task: Task) -> str:
    """A short hash that changes whenever the test split would: the task's settings that shape the data (the
    shard folder's path aside), and, for shards, the bytes of the test shards. Generated data follow from the
    settings and the generator's encoding."""
    settings = {f: getattr(task.cfg, f) for f in task.data_fields if f != "data"}
    if task.data_format and not task.cfg.data:
        settings["data_format"] = task.data_format
    digest = hashlib.sha256(json.dumps({"task": task.name, **settings}, sort_keys=True, default=str).encode())
    if task.cfg.data:
        fs, root = file_system(task.cfg.data)
        for shard in parquet_files(fs, f"{root}/test"):
            with fs.open_input_stream(shard) as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def prepare(task: Task) -> PreparedData:
    """Read the task's shards (every shard checked first) or generate its data, then decode every split once.

    The prepared task reads the shards it was prepared from: for `--data` naming WebDataset tar shards, their
    converted shard folder, which the run's record, the model card and the test fingerprint then name."""
    if task.cfg.data:
        shards = shard_folder(task)  # WebDataset tar shards: their conversion, made once
        raw, manifest = open_shards(shards, task.name, task.schema, rows_per_block=DECODE_BATCH)
        task = task.resolved(manifest).replace(data=shards)
    else:
        raw = task.generate()
    decode = task.preprocessor()
    splits = {}
    for split, ds in raw.items():
        try:
            splits[split] = ds.map_batches(decode, batch_format="numpy", batch_size=DECODE_BATCH).materialize()
        except ray.exceptions.RayTaskError as e:
            if task.cfg.data and find_cause(e, lambda c: isinstance(c, (OSError, pa.ArrowException))):
                name_damaged_shard(task.cfg.data, split, task.schema)  # a damaged page: one line naming its file
            raise
    return PreparedData(task, splits, {split: ds.count() for split, ds in splits.items()}, test_fingerprint(task))


def steps_per_epoch(data: PreparedData, batch_size: int) -> int:
    """Optimizer steps in one epoch of the train split at global batch `batch_size`."""
    steps = data.rows["train"] // batch_size
    if steps == 0:
        raise CliptimeError(f"the train split has {data.rows['train']} rows, fewer than --batch-size {batch_size}")
    return steps


def training_datasets(data: PreparedData, seed: int) -> dict[str, ray.data.Dataset]:
    """The datasets a run's workers read: the train split in a seeded block order (Ray Data keeps an integer seed's
    order for every epoch); the validation split as prepared.

    Rows are mixed by each worker's local shuffle buffer (see cliptime.train), seeded anew each epoch: a batch
    mixes many sequences and pairs without the cost of a global shuffle."""
    return {"train": data.splits["train"].randomize_block_order(seed=seed), "val": data.splits["val"]}
