"""Run on a Ray cluster (RAY_ADDRESS): one DDP step of the CLIPTime model with two workers on different nodes.

Each rank trains on different random data, so its weights after the step equal the other rank's only if DDP
averaged the gradients across the nodes. Each rank saves its weights and node id to OUT_DIR/rank<r>.pt; the test
compares them. Usage: python tests/multinode_ddp.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

TINY = {"sequences": 7, "frames": 10, "image_size": 32, "head_depth": 1, "ffn_dim": 64}


def one_step(config: dict) -> None:
    from cliptime.tasks import make_task

    task = make_task("cliptime", TINY)
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)  # the same initial weights on both ranks
    model = ray.train.torch.prepare_model(task.build_model())
    module = model.module if hasattr(model, "module") else model
    # parameters only: BatchNorm running statistics are per rank until DDP broadcasts them at the next forward
    initial = {k: v.detach().clone() for k, v in module.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    batch = {
        "image": torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8, generator=g),
        "tokens": torch.randint(1, 1000, (4, 32), generator=g),
        "stage": torch.randint(0, 3, (4,), generator=g),
        "t": torch.rand(4, generator=g),
    }
    loss, _ = task.loss(model, batch)
    loss.backward()
    optimizer.step()
    state = {k: v.detach().clone() for k, v in module.named_parameters()}
    node = ray.get_runtime_context().get_node_id()
    torch.save({"initial": initial, "state": state, "node": node}, Path(config["out"]) / f"rank{rank}.pt")


def main() -> None:
    ray.init()
    trainer = TorchTrainer(
        one_step,
        train_loop_config={"out": sys.argv[1]},
        scaling_config=ScalingConfig(
            num_workers=2, resources_per_worker={"CPU": 1}, placement_strategy="STRICT_SPREAD"
        ),
    )
    trainer.fit()


if __name__ == "__main__":
    main()
