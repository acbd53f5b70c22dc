"""The one training path, generic over tasks.

    data (shards or generator) -> Ray Data map_batches (decode/augment/tokenize)
      -> TorchTrainer workers (DDP, checkpoint per epoch, resume) -> test evaluation -> MLflow run + registry

`train_loop_per_worker` reads like plain PyTorch; everything task-specific comes from the `Task`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
from mlflow.tracking import MlflowClient
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cliptime import tracking
from cliptime.config import TrainConfig, flat_params, from_dict
from cliptime.data.shards import open_shards
from cliptime.errors import CliptimeError
from cliptime.tasks import make_task
from cliptime.tasks.base import Task

RUN_FILE = "cliptime_run.json"  # beside Ray's own files in STORAGE/NAME: what --resume needs
EVAL_BATCH = 256
HISTORY_FILE = "history.json"  # in every checkpoint: the metrics of all epochs so far
SHUFFLE_BATCHES = 8  # local shuffle buffer of each worker, in batches


# -- data ---------------------------------------------------------------------------------------------------
def load_data(task: Task) -> dict[str, ray.data.Dataset]:
    """Raw shard-schema rows per split: the user's shards (checked first) or the task's generator (made once)."""
    if task.cfg.data:
        datasets, manifest = open_shards(task.cfg.data, task.name, task.schema)
        task.check_manifest(manifest)
        return datasets
    return {split: ds.materialize() for split, ds in task.generate().items()}


def preprocess(
    task: Task, raw: dict[str, ray.data.Dataset], batch_size: int, seed: int = 0
) -> dict[str, ray.data.Dataset]:
    """Model-ready datasets. Decoding (deterministic, the heavy libraries) runs once per split and is kept in
    the object store; the train split is then shuffled and augmented anew each epoch, streamed into the workers.

    Shuffling: blocks (a generated sequence, a shard's row group) in a new seeded order each epoch, then rows
    through the workers' local shuffle buffer (`SHUFFLE_BATCHES` batches): a batch mixes many sequences and
    pairs without the cost of a global shuffle."""
    out = {}
    for split, ds in raw.items():
        decoded = ds.map_batches(task.preprocessor(), batch_format="numpy", batch_size=batch_size).materialize()
        if split != "train":
            out[split] = decoded
            continue
        out[split] = decoded.randomize_block_order(seed=seed)
        augment = task.augmenter()
        if augment is not None:
            out[split] = out[split].map_batches(augment, batch_format="numpy")
    return out


# -- the training loop, on every worker ---------------------------------------------------------------------
def use_cpus(n: int) -> None:
    """Train on `n` CPU threads: exactly the CPUs a worker reserved (more would steal Ray Data's, fewer would idle
    them), with denormal floats flushed to zero. As weights train, activations and gradients hold more denormals,
    which x86 cores handle far slower: measured, the tiny CLIPTime step went from 0.29 to 0.37 s by step 75
    without the flush and stayed at 0.28 s with it."""
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> tuple[list, torch.optim.Optimizer]:
    """(the trained parameters, their AdamW optimizer with `tc`'s settings)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    task = make_task(config["task"], config["task_config"])
    tc = from_dict(TrainConfig, config["train_config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        use_cpus(tc.cpus_per_worker)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank

    module = task.build_model()
    model = ray.train.torch.prepare_model(module)  # moved to the device; DDP-wrapped with several workers
    if tc.compile:
        model = torch.compile(model)  # shares its parameters with `module`, which checkpoints save
    params, optimizer = make_optimizer(model, tc)
    steps_per_epoch = config["steps_per_epoch"]
    total = max(1, steps_per_epoch * tc.epochs)
    warmup = max(1, int(tc.warmup_fraction * total))
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup)),
        ],
        milestones=[warmup],
    )
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=True)
            history = json.loads((Path(d) / HISTORY_FILE).read_text())
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1

    amp = tc.use_gpu and tc.amp
    amp_dtype = getattr(torch, tc.amp_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)  # fp16 needs scaling
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")
    # --batch-size is the global batch of one optimizer step: world x grad_accum micro-batches
    per_worker_batch = tc.batch_size // (world * tc.grad_accum)
    for epoch in range(start_epoch, tc.epochs):
        started = time.time()
        task.start_epoch(epoch, tc.epochs)
        model.train()
        sums: dict[str, torch.Tensor] = {}  # summed on the device: no host sync per step
        steps = 0
        waited, fetch_started = 0.0, time.time()
        batches = train_shard.iter_torch_batches(
            batch_size=per_worker_batch,
            device=device,
            drop_last=True,
            local_shuffle_buffer_size=SHUFFLE_BATCHES * per_worker_batch,
            local_shuffle_seed=tc.seed + 1000 * epoch + rank,
        )
        # micro-batches left over at the end of the last epoch (fewer than grad_accum) must not leak into this one
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(batches):
            waited += time.time() - fetch_started
            stepping = (i + 1) % tc.grad_accum == 0
            # DDP all-reduces gradients only on the micro-batch that ends an optimizer step
            sync = contextlib.nullcontext() if stepping or world == 1 else model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    loss, parts = task.loss(model, task.train_transform(batch))
                scaler.scale(loss / tc.grad_accum).backward()
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / tc.grad_accum
            if stepping:
                if tc.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                steps += 1
            fetch_started = time.time()
        # time the step waited for its batch: what the data pipeline costs the model
        train_seconds = time.time() - started
        metrics = {
            "epoch": epoch,
            "lr": scheduler.get_last_lr()[0],
            "data_wait_fraction": waited / train_seconds,
            "samples_per_second": steps * tc.batch_size / train_seconds,  # global: every worker runs as many steps
        }
        metrics.update({f"train/{k}": float(v) / max(steps, 1) for k, v in sums.items()})
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if rank == 0:
                batches = val_data.iter_torch_batches(batch_size=EVAL_BATCH, device=device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    val_metrics, _ = task.evaluate(module, batches)
                metrics.update({f"val/{k}": v for k, v in val_metrics.items()})
                state = {
                    "model": module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                }
                torch.save(state, Path(tmp) / "state.pt")
                history.append(metrics)
                (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
                saved = ray.train.Checkpoint.from_directory(tmp)
                shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("epoch", "lr"))
                shown += f" | {time.time() - started - waited:.0f} s compute+eval, {waited:.0f} s waiting for data"
                print(
                    f"epoch {epoch + 1}/{tc.epochs} ({steps} steps, {time.time() - started:.0f} s): {shown}", flush=True
                )
            ray.train.report(metrics, checkpoint=saved)


# -- evaluation of a checkpoint, where the workers ran ------------------------------------------------------
def load_checkpoint_model(task: Task, checkpoint: ray.train.Checkpoint, device: str = "cpu") -> torch.nn.Module:
    model = task.build_model(load_pretrained=False)
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


@ray.remote
def _evaluate_remote(task_name: str, task_config: dict, checkpoint, dataset: ray.data.Dataset, use_gpu: bool):
    task = make_task(task_name, task_config)
    device = "cuda" if use_gpu else "cpu"
    model = load_checkpoint_model(task, checkpoint, device)
    return task.evaluate(model, dataset.iter_torch_batches(batch_size=EVAL_BATCH, device=device))


# -- the whole job ------------------------------------------------------------------------------------------
@dataclass
class JobResult:
    task: str
    run_id: str
    run_name: str
    model_name: str | None
    model_version: str | None
    metrics: dict[str, float]
    checkpoint: str


def _storage(storage_path: str) -> tuple[pyarrow.fs.FileSystem, str, str]:
    """(filesystem, path within it, the storage path Ray should get) for a local dir or a URI."""
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).expanduser().resolve())
    fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    return fs, root, storage_path


def find_saved(fs, root: str, name: str, *, task: str, kind: str, prefix: str, marker: str) -> tuple[str, dict]:
    """(name, saved JSON) of the run or sweep `name` under `root`; `name` 'latest' picks the newest directory
    starting with `prefix` that holds the `marker` file. `kind` ("run" or "sweep") words the errors."""
    if name == "latest":
        found = []
        for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
            saved = fs.get_file_info(f"{info.path}/{marker}")
            if saved.type == pyarrow.fs.FileType.File and info.base_name.startswith(prefix):
                found.append((saved.mtime, info.base_name))
        if not found:
            raise CliptimeError(f"--resume: no {task} {kind} to resume under {root}")
        name = sorted(found)[-1][1]
    try:
        with fs.open_input_stream(f"{root}/{name}/{marker}") as f:
            return name, json.loads(f.read())
    except FileNotFoundError:
        raise CliptimeError(f"--resume {name}: no such {kind} under {root}") from None


def init_ray(reserved_cpus: int = 0) -> None:
    """Connect to the cluster `ray job submit` runs us on (RAY_ADDRESS), or start a local Ray.

    Locally Ray gets at least one logical CPU more than training workers reserve, so Ray Data always has one
    to run on (with none left it stalls, and training waits on it forever).
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    start_local_ray(max(os.cpu_count() or 1, reserved_cpus + 1))


def start_local_ray(num_cpus: int, env_vars: dict[str, str] | None = None) -> None:
    """A new Ray instance on this machine with its dashboard on 127.0.0.1, even where a `ray start` cluster on
    this machine would be auto-joined (address="local").

    The dashboard is not only for watching: Ray Train's placement-group cleaner (a detached actor) asks the
    state API, which the dashboard serves, whether a run's controller is still alive, and removes the run's
    placement group when it is not. Without it, a run whose controller is killed (a Tune trial that ASHA
    stops) keeps its workers' CPUs reserved until the driver exits, and the next trial's Ray Data tasks wait
    for CPUs forever. RAY_API_SERVER_ADDRESS tells the cleaner, and every worker, which dashboard is ours.
    """
    port = free_port()
    api_server = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api_server, **(env_vars or {})}},
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_data(task: Task, tc: TrainConfig) -> tuple[dict[str, ray.data.Dataset], int]:
    """(model-ready datasets per split, optimizer steps per epoch) for `task` trained with `tc`."""
    raw = load_data(task)
    n_train = raw["train"].count()
    steps_per_epoch = n_train // tc.batch_size
    if steps_per_epoch == 0:
        raise CliptimeError(f"the train split has {n_train} rows, fewer than --batch-size {tc.batch_size}")
    micro_batch = max(1, tc.batch_size // (tc.num_workers * tc.grad_accum))
    return preprocess(task, raw, batch_size=micro_batch, seed=tc.seed), steps_per_epoch


def fit(
    task: Task, tc: TrainConfig, datasets: dict, steps_per_epoch: int, name: str, storage_path: str, callbacks: list
) -> ray.train.Result:
    """Train `task` as Ray Train run `name` (resuming it if its storage holds checkpoints)."""
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "task": task.name,
            "task_config": asdict(task.cfg),
            "train_config": asdict(tc),
            "steps_per_epoch": steps_per_epoch,
        },
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker},
            placement_strategy=tc.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            callbacks=callbacks,
        ),
        datasets={"train": datasets["train"], "val": datasets["val"]},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    return trainer.fit()


def test(task: Task, tc: TrainConfig, checkpoint: ray.train.Checkpoint, dataset: ray.data.Dataset):
    """(metrics, outputs) of the checkpoint on the test split, computed where GPUs are if training used them."""
    print(f"evaluating {checkpoint.path} on the test split", flush=True)
    return ray.get(
        _evaluate_remote.options(num_gpus=1 if tc.use_gpu else 0).remote(
            task.name, asdict(task.cfg), checkpoint, dataset, tc.use_gpu
        )
    )


def _fit_and_test(
    task: Task,
    tc: TrainConfig,
    datasets: dict,
    steps_per_epoch: int,
    name: str,
    storage_path: str,
    uri: str,
    run_id: str,
):
    result = fit(task, tc, datasets, steps_per_epoch, name, storage_path, [tracking.EpochLogger(uri, run_id)])
    with result.checkpoint.as_directory() as d:
        tracking.log_missing_epochs(MlflowClient(uri), run_id, json.loads((Path(d) / HISTORY_FILE).read_text()))
    metrics, outputs = test(task, tc, result.checkpoint, datasets["test"])
    return result, metrics, outputs


class _RunFile:
    """STORAGE/NAME/cliptime_run.json: the configs and MLflow run ids that `--resume` needs."""

    def __init__(self, fs: pyarrow.fs.FileSystem, root: str, name: str):
        self.fs, self.path = fs, f"{root}/{name}/{RUN_FILE}"
        fs.create_dir(f"{root}/{name}", recursive=True)

    def write(self, content: dict) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps(content, indent=2).encode())


def run(task: Task, tc: TrainConfig) -> JobResult:
    """Check inputs, train (and the task's baseline, if any), test, log everything and register the model."""
    uri = tracking.tracking_uri()
    fs, root, storage_path = _storage(tc.storage_path)
    saved: dict = {}
    if tc.resume:
        name, saved = find_saved(
            fs, root, tc.resume, task=task.name, kind="run", prefix=f"{task.name}-", marker=RUN_FILE
        )
        task = make_task(saved["task"], saved["task_config"])
        tc = from_dict(TrainConfig, {**saved["train_config"], "resume": tc.resume})
        print(f"resuming {name} (MLflow run {saved['mlflow_run_id']}) with its saved configuration", flush=True)
    else:
        name = tc.name or f"{task.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    tc.check()
    task.check()
    tracking.check_reachable(uri)
    init_ray(tc.num_workers * tc.cpus_per_worker)

    datasets, steps_per_epoch = prepare_data(task, tc)

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    run_file = _RunFile(fs, root, name)
    if not saved:
        run_id = client.create_run(
            tracking.experiment_id(client, tc.experiment), run_name=name, tags={"cliptime.task": task.name}
        ).info.run_id
        mlflow.log_params({**flat_params("task", task.cfg), **flat_params("train", tc)}, run_id=run_id)
        saved = {
            "task": task.name,
            "task_config": asdict(task.cfg),
            "train_config": asdict(tc),
            "mlflow_run_id": run_id,
        }
        run_file.write(saved)
    run_id = saved["mlflow_run_id"]
    try:
        with mlflow.start_run(run_id=run_id):
            result, metrics, outputs = _fit_and_test(
                task, tc, datasets, steps_per_epoch, name, storage_path, uri, run_id
            )
            test_metrics = {f"test/{k}": v for k, v in metrics.items()}
            mlflow.log_metrics(test_metrics)
            baseline_outputs = None
            baseline = task.baseline()
            if baseline is not None:
                if "baseline_run_id" not in saved:
                    saved["baseline_run_id"] = client.create_run(
                        tracking.experiment_id(client, tc.experiment),
                        run_name=f"{name}-baseline",
                        tags={"cliptime.task": task.name, "mlflow.parentRunId": run_id},
                    ).info.run_id
                    mlflow.log_params(flat_params("task", baseline.cfg), run_id=saved["baseline_run_id"])
                    run_file.write(saved)
                _, baseline_metrics, baseline_outputs = _fit_and_test(
                    baseline,
                    tc,
                    datasets,
                    steps_per_epoch,
                    f"{name}-baseline",
                    storage_path,
                    uri,
                    saved["baseline_run_id"],
                )
                client.set_terminated(saved["baseline_run_id"])
                mlflow.log_metrics({f"baseline/test/{k}": v for k, v in baseline_metrics.items()})
                test_metrics.update({f"baseline/test/{k}": v for k, v in baseline_metrics.items()})
            tracking.log_figures(run_id, task.figures(outputs, baseline_outputs), client)
            model = load_checkpoint_model(task, result.checkpoint)
            _, version = tracking.log_and_register(
                task,
                model,
                asdict(task.cfg),
                tc.register,
                tags={"run_name": name, **{k: f"{v:.4f}" for k, v in test_metrics.items()}},
            )
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    final = {k: v for k, v in (result.metrics or {}).items() if k.startswith("val/")}
    return JobResult(
        task=task.name,
        run_id=run_id,
        run_name=name,
        model_name=task.registered_model if version else None,
        model_version=version,
        metrics={**final, **test_metrics},
        checkpoint=result.checkpoint.path,
    )
