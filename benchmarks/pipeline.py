"""How close the Ray pipeline runs to the model's own speed, per task, with the default model and batch size.

    python benchmarks/pipeline.py                      # both tasks
    python benchmarks/pipeline.py --task tclap --steps 10

For the same model, batch size and number of steps, training samples per second of
  (a) the training step alone, on batches already in memory (the ceiling);
  (b) a plain PyTorch DataLoader (one loader process) over the same Parquet shards, decoding and augmenting;
  (c) the project's path: Ray Data -> TorchTrainer (`cliptime.train.fit`), the reported `samples_per_second`
      of its last epoch.
Each uses the worker's CPU reservation (`--cpus-per-worker`, 2) as torch threads. Target: (c)/(a) >= 0.90.
Results: benchmarks/results/pipeline-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine, today, write_results


def data_config(task: str, scale: float) -> dict:
    """Generated sets smaller than the jobs' (the model and batch size are the defaults): enough steps to time."""
    if task == "cliptime":
        return {"sequences": max(7, round(14 * scale)), "frames": max(10, round(100 * scale))}
    pairs = max(8, round(200 * scale))
    return {"train_pairs": pairs, "train_singles": pairs // 2, "eval_pairs": max(4, pairs // 10), "eval_singles": 4}


def step_fn(task, model, optimizer):
    def step(batch) -> None:
        loss, _ = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(step, batches, steps: int, warmup: int = 2) -> float:
    """Samples per second over `steps` steps after `warmup` untimed ones."""
    it = iter(batches)
    for _ in range(warmup):
        step(next(it))
    started, samples = time.time(), 0
    for _ in range(steps):
        batch = next(it)
        step(batch)
        samples += len(next(iter(batch.values())))
    return samples / (time.time() - started)


def shard_batches(task, data_dir: Path, batch_size: int):
    """A torch IterableDataset over the train shards: read, decode, augment, as a DataLoader would."""
    import pyarrow.parquet as pq
    import torch

    class ShardBatches(torch.utils.data.IterableDataset):
        def __iter__(self):
            decode, augment = task.preprocessor(), task.augmenter()
            while True:  # as many epochs as the benchmark asks for
                for path in sorted((data_dir / "train").glob("*.parquet")):
                    for rows in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
                        columns = zip(rows.schema.names, rows.columns)
                        batch = decode({k: v.to_numpy(zero_copy_only=False) for k, v in columns})
                        if augment is not None:
                            batch = augment(batch)
                        if len(batch[next(iter(batch))]) == batch_size:
                            yield {k: torch.as_tensor(v) for k, v in batch.items()}

    return ShardBatches()


def bench(task_name: str, steps: int, cpus: int, scale: float, batch_size: int) -> dict:
    import numpy as np
    import torch

    from cliptime import train
    from cliptime.config import TrainConfig
    from cliptime.data.shards import write_shards
    from cliptime.tasks import TASKS, make_task

    task_cls = TASKS[task_name]
    batch_size = batch_size or task_cls.train_defaults["batch_size"]
    torch.set_num_threads(cpus)
    train.init_ray(cpus)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "shards"
        task = make_task(task_name, data_config(task_name, scale))
        write_shards(task.generate(), data_dir, task=task.name, label=task.label_column, source=task.source())
        task = make_task(task_name, {"data": str(data_dir)})
        tc = TrainConfig(
            **{**task_cls.train_defaults, "batch_size": batch_size, "epochs": 2, "cpus_per_worker": cpus},
            storage_path=str(Path(tmp) / "ray_results"),
        )
        datasets, steps_per_epoch = train.prepare_data(task, tc)
        steps = max(1, min(steps, steps_per_epoch - 2))

        def fresh_model():
            torch.manual_seed(0)
            model = task.build_model().train()
            return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

        # (a) ceiling: steps over batches already decoded and in memory
        in_memory = [
            {k: torch.as_tensor(np.asarray(v)) for k, v in b.items()}
            for b in datasets["train"].iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True)
        ][: steps + 2]
        model, opt = fresh_model()
        ceiling = timed(step_fn(task, model, opt), in_memory, steps)

        # (b) plain PyTorch DataLoader over the same shards, one loader process
        loader = torch.utils.data.DataLoader(
            shard_batches(task, data_dir, batch_size), batch_size=None, num_workers=1, prefetch_factor=4
        )
        model, opt = fresh_model()
        dataloader = timed(step_fn(task, model, opt), loader, steps)

        # (c) the project's Ray Data -> TorchTrainer path, its last (warm) epoch
        result = train.fit(task, tc, datasets, steps_per_epoch, f"pipeline-{task_name}", tc.storage_path, [])
        ray_path = float(result.metrics["samples_per_second"])
    return {
        "task": task_name,
        "model": getattr(task.cfg, "model", None) or task.cfg.audio_model,
        "batch_size": batch_size,
        "timed_steps": steps,
        "cpus_per_worker": cpus,
        "samples_per_second": {"a_step_only": ceiling, "b_dataloader": dataloader, "c_ray": ray_path},
        "b_over_a": dataloader / ceiling,
        "c_over_a": ray_path / ceiling,
        "data_wait_fraction_c": float(result.metrics["data_wait_fraction"]),
    }


def markdown(rows: list[dict], command: str, when: str, where: str) -> str:
    out = [
        f"# Pipeline benchmark, {when}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {where}",
        "",
        "| task | model | batch | (a) step only, samples/s | (b) DataLoader | (c) Ray Data -> TorchTrainer "
        "| (b)/(a) | (c)/(a) | (c) data wait |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["samples_per_second"]
        out.append(
            f"| {r['task']} | {r['model']} | {r['batch_size']} | {s['a_step_only']:.1f} | {s['b_dataloader']:.1f} "
            f"| {s['c_ray']:.1f} | {r['b_over_a']:.2f} | {r['c_over_a']:.2f} | {r['data_wait_fraction_c']:.3f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["cliptime", "tclap", "all"], default="all")
    parser.add_argument("--steps", type=int, default=15, help="timed steps for (a) and (b)")
    parser.add_argument("--cpus-per-worker", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="size of the generated sets (tests use a tiny one)")
    parser.add_argument("--batch-size", type=int, default=0, help="global batch (0: the task's default)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    tasks = ["cliptime", "tclap"] if args.task == "all" else [args.task]
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"]
    command = "python benchmarks/pipeline.py " + " ".join(flags)
    when = today()
    payload = {"date": when, "machine": machine(), "command": command, "results": []}
    for task in tasks:
        payload["results"].append(bench(task, args.steps, args.cpus_per_worker, args.scale, args.batch_size))
        report = markdown(payload["results"], command, when, payload["machine"])
        written = write_results(args.out, f"pipeline-{'-'.join(tasks)}-{when}", payload, report)
    print(json.dumps({"written": str(written), "results": payload["results"]}))


if __name__ == "__main__":
    main()
