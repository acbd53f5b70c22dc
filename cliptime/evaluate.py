"""Held-out evaluation of a checkpoint, run where the workers ran (on a GPU if training used one)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import ray
import ray.train

from cliptime.config import TrainConfig
from cliptime.tasks import make_task, task_ref
from cliptime.tasks.base import Task
from cliptime.train import EVAL_BATCH, load_checkpoint_model


@ray.remote
def _evaluate(task: str, task_config: dict, checkpoint: ray.train.Checkpoint, dataset, use_gpu: bool):
    # The task is rebuilt from its config, as the training workers rebuild it: the same task.
    task = make_task(task, task_config)
    device = "cuda" if use_gpu else "cpu"
    model = load_checkpoint_model(task, checkpoint, device)
    return task.evaluate(model, dataset.iter_torch_batches(batch_size=EVAL_BATCH, device=device))


def test(
    task: Task, tc: TrainConfig, checkpoint: ray.train.Checkpoint, dataset: ray.data.Dataset
) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, outputs) of the checkpoint on the test split."""
    print(f"evaluating {checkpoint.path} on the test split", flush=True)
    remote = _evaluate.options(num_gpus=1 if tc.use_gpu else 0)
    return ray.get(remote.remote(task_ref(task), asdict(task.cfg), checkpoint, dataset, tc.use_gpu))
