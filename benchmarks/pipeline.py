"""How close the Ray pipeline runs to the model's own speed, per task, with the default model and batch size.

    python benchmarks/pipeline.py                      # both tasks
    python benchmarks/pipeline.py --task tclap --steps 10

For the same model, batch size and number of steps, training samples per second of
  (a) the training step alone, on batches already in memory (the ceiling);
  (b) a plain PyTorch DataLoader (one loader process) over the same Parquet shards, decoding;
  (c) the project's path: Ray Data -> TorchTrainer (`cliptime.train.fit`), the reported `samples_per_second`
      of its last epoch.
Each uses the worker's CPU reservation (`--cpus-per-worker`, 2) as torch threads. The three run back to back in
`--repeats` rounds; speeds and ratios are medians over rounds. Target: (c)/(a) >= 0.90.
Results: benchmarks/results/pipeline-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine, today, write_results

WARMUP = 4  # untimed steps first: the first ones allocate, and a DataLoader starts its process


def data_config(task: str, scale: float) -> dict:
    """The jobs' default generated set, its size times `scale` (1: an epoch as long as a default job's)."""
    from cliptime.tasks import task_class

    cls = task_class(task)
    defaults = cls.Config()
    return {k: max(least, round(getattr(defaults, k) * scale)) for k, least in cls.data_sizes.items()}


def step_fn(task, tc, model):
    """The loop's optimizer step (its on-device augmentation, optimizer, gradient clipping), without the data
    pipeline."""
    import torch

    from cliptime.train import make_optimizer

    params, optimizer = make_optimizer(model, tc)

    def step(batch) -> None:
        loss, _ = task.loss(model, task.train_transform(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        optimizer.step()

    return step


def timed(step, batches, steps: int, warmup: int = WARMUP) -> float:
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
    """A torch IterableDataset over the train shards: read and decode, as a DataLoader would."""
    import pyarrow.parquet as pq
    import torch

    class ShardBatches(torch.utils.data.IterableDataset):
        def __iter__(self):
            decode = task.preprocessor()
            while True:  # as many epochs as the benchmark asks for
                for path in sorted((data_dir / "train").glob("*.parquet")):
                    for rows in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
                        columns = zip(rows.schema.names, rows.columns)
                        batch = decode({k: v.to_numpy(zero_copy_only=False) for k, v in columns})
                        if len(batch[next(iter(batch))]) == batch_size:
                            yield {k: torch.as_tensor(v) for k, v in batch.items()}

    return ShardBatches()


def bench(task_name: str, steps: int, cpus: int, scale: float, batch_size: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from cliptime import train
    from cliptime.data.shards import write_shards
    from cliptime.pipeline import prepare, steps_per_epoch, training_datasets
    from cliptime.runtime import init_ray
    from cliptime.tasks import make_task, task_class

    task_cls = task_class(task_name)
    batch_size = batch_size or task_cls.train_config().batch_size
    train.use_cpus(cpus)  # as the training workers do
    init_ray(cpus)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "shards"
        task = make_task(task_name, data_config(task_name, scale))
        write_shards(task.generate(), data_dir, task=task.name, label=task.label_column, source=task.source())
        tc = task_cls.train_config(
            batch_size=batch_size, epochs=2, cpus_per_worker=cpus, storage_path=str(Path(tmp) / "ray_results")
        )
        data = prepare(make_task(task_name, {"data": str(data_dir)}))
        task = data.task
        datasets = training_datasets(data, tc.seed)
        epoch_steps = steps_per_epoch(data, tc.batch_size)
        steps = max(1, min(steps, epoch_steps - WARMUP))

        def fresh_model():
            torch.manual_seed(0)
            return task.build_model().train()

        in_memory = [
            {k: torch.as_tensor(np.asarray(v)) for k, v in b.items()}
            for b in datasets["train"].iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True)
        ][: steps + WARMUP]
        loader = torch.utils.data.DataLoader(
            shard_batches(task, data_dir, batch_size), batch_size=None, num_workers=1, prefetch_factor=4
        )
        # Rounds of (a), (b), (c) back to back: this machine's speed drifts by ~10% over minutes, so a ratio
        # only compares runs of one round, and the reported figures are medians over the rounds.
        rounds = []
        for r in range(repeats):
            speeds = {}
            # (a) the ceiling: steps over batches already decoded and in memory
            speeds["a_step_only"] = timed(step_fn(task, tc, fresh_model()), in_memory, steps)
            # (b) a plain PyTorch DataLoader over the same shards, one loader process
            speeds["b_dataloader"] = timed(step_fn(task, tc, fresh_model()), loader, steps)
            # (c) the project's Ray Data -> TorchTrainer path, its last (warm) epoch
            result = train.fit(task, tc, datasets, epoch_steps, f"pipeline-{task_name}-{r}", tc.storage_path, [])
            speeds["c_ray"] = float(result.metrics["samples_per_second"])
            speeds["c_data_wait_fraction"] = float(result.metrics["data_wait_fraction"])
            rounds.append(speeds)

    def median(values) -> float:
        return float(np.median(list(values)))

    c_over_a = [r["c_ray"] / r["a_step_only"] for r in rounds]

    return {
        "task": task_name,
        "model": getattr(task.cfg, "model", None) or task.cfg.audio_model,
        "batch_size": batch_size,
        "timed_steps": steps,
        "steps_per_epoch": epoch_steps,
        "cpus_per_worker": cpus,
        "rounds": rounds,
        "samples_per_second": {k: median(r[k] for r in rounds) for k in ("a_step_only", "b_dataloader", "c_ray")},
        "b_over_a": median(r["b_dataloader"] / r["a_step_only"] for r in rounds),
        "c_over_a": median(c_over_a),
        "c_over_a_range": [min(c_over_a), max(c_over_a)],
        "data_wait_fraction_c": median(r["c_data_wait_fraction"] for r in rounds),
    }


def markdown(rows: list[dict], command: str, when: str, where: str) -> str:
    out = [
        f"# Pipeline benchmark, {when}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {where}",
        "",
        "| task | model | batch | (a) step only, samples/s | (b) DataLoader | (c) Ray Data -> TorchTrainer "
        "| (b)/(a) | (c)/(a) | (c)/(a) range | (c) data wait |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["samples_per_second"]
        out.append(
            f"| {r['task']} | {r['model']} | {r['batch_size']} | {s['a_step_only']:.1f} | {s['b_dataloader']:.1f} "
            f"| {s['c_ray']:.1f} | {r['b_over_a']:.2f} | {r['c_over_a']:.2f} "
            f"| {r['c_over_a_range'][0]:.2f}-{r['c_over_a_range'][1]:.2f} | {r['data_wait_fraction_c']:.3f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["cliptime", "tclap", "all"], default="all")
    parser.add_argument("--steps", type=int, default=15, help="timed steps for (a) and (b)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (a), (b), (c); medians are reported")
    parser.add_argument("--cpus-per-worker", type=int, default=2)
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="size of the generated sets, times the jobs' defaults (tests use a tiny one)",
    )
    parser.add_argument("--batch-size", type=int, default=0, help="global batch (0: the task's default)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    tasks = ["cliptime", "tclap"] if args.task == "all" else [args.task]
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"]
    command = "python benchmarks/pipeline.py " + " ".join(flags)
    when = today()
    payload = {"date": when, "machine": machine(), "command": command, "results": []}
    for task in tasks:
        payload["results"].append(
            bench(task, args.steps, args.cpus_per_worker, args.scale, args.batch_size, args.repeats)
        )
        report = markdown(payload["results"], command, when, payload["machine"])
        written = write_results(args.out, f"pipeline-{'-'.join(tasks)}-{when}", payload, report)
    print(json.dumps({"written": str(written), "results": payload["results"]}))


if __name__ == "__main__":
    main()
