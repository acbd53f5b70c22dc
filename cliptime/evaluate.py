"""Held-out evaluation of a model, run where the workers ran (on a GPU if training used one)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import ray
import ray.train
import torch

from cliptime.config import TrainConfig
from cliptime.tasks import make_task, task_ref
from cliptime.tasks.base import Task
from cliptime.train import EVAL_BATCH, load_checkpoint_model


@ray.remote
def _evaluate(task: str, task_config: dict, weights: ray.train.Checkpoint | dict, dataset, use_gpu: bool):
    # The task is rebuilt from its config, as the training workers rebuild it: the same task.
    task = make_task(task, task_config)
    device = "cuda" if use_gpu else "cpu"
    if isinstance(weights, ray.train.Checkpoint):
        model = load_checkpoint_model(task, weights, device)
    else:
        model = task.build_model(load_pretrained=False)
        model.load_state_dict(weights)
        model = model.to(device).eval()
    return task.evaluate(model, dataset.iter_torch_batches(batch_size=EVAL_BATCH, device=device))


def test(
    task: Task, tc: TrainConfig, weights: ray.train.Checkpoint | torch.nn.Module, dataset: ray.data.Dataset
) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, outputs) on the test split of a training checkpoint, or of a model (a registered one)."""
    print(f"evaluating {getattr(weights, 'path', type(weights).__name__)} on the test split", flush=True)
    if isinstance(weights, torch.nn.Module):
        weights = weights.state_dict()
    remote = _evaluate.options(num_gpus=1 if tc.use_gpu else 0)
    return ray.get(remote.remote(task_ref(task), asdict(task.cfg), weights, dataset, tc.use_gpu))
