"""The training loop on every Ray Train worker, and the TorchTrainer that runs it; generic over tasks.

`train_loop_per_worker` reads like plain PyTorch: build the task's model, resume from the last checkpoint if
there is one, then per epoch train on this worker's shard of the data, validate on rank 0, and report the
metrics with a checkpoint. Everything task-specific comes from the `Task`, rebuilt here from its config.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import signal
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, CheckpointUploadMode, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cliptime.config import TrainConfig, from_dict
from cliptime.console import Messages, follow
from cliptime.errors import CliptimeError
from cliptime.runtime import handlers_kept, joined
from cliptime.tasks import make_task, task_ref
from cliptime.tasks.base import Task

EVAL_BATCH = 256
STATE_FILE = "state.pt"  # in every checkpoint: model, optimizer, scheduler and the epoch
HISTORY_FILE = "history.json"  # in every checkpoint: the metrics of all epochs so far, and when each ended
SHUFFLE_BATCHES = 8  # local shuffle buffer of each worker, in batches
EPOCH_LINE_METRICS = 6  # validation metrics on each epoch's line
EPOCH_ENDED = "ended_at"  # in each epoch of a checkpoint's history: the wall-clock time the epoch ended
# what reading a cut-short or damaged checkpoint raises: torch.load of an empty file EOFError, of a cut zip
# RuntimeError, of foreign pickles UnpicklingError; a damaged history.json ValueError; a state without its keys KeyError
UNREADABLE_CHECKPOINT = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError)


# -- checkpoints ----------------------------------------------------------------------------------------------
def save_checkpoint(folder: Path, state: dict[str, Any], history: list[dict]) -> ray.train.Checkpoint:
    torch.save(state, folder / STATE_FILE)
    (folder / HISTORY_FILE).write_text(json.dumps(history))
    return ray.train.Checkpoint.from_directory(folder)


def load_checkpoint(checkpoint: ray.train.Checkpoint, device: str | torch.device) -> tuple[dict, list[dict]]:
    """(state, history) of a checkpoint; tensors only, no pickled code (`weights_only`)."""
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
    return state, read_history(checkpoint)


def checkpoint_folders(run_folder: str) -> tuple[pyarrow.fs.FileSystem, list[str]]:
    """(file system, the checkpoint folders of the Ray Train run in `run_folder`, newest first: Ray names them by
    the time it made them)."""
    fs, root = pyarrow.fs.FileSystem.from_uri(run_folder)
    found = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    folders = [
        i.path for i in found if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")
    ]
    return fs, sorted(folders, reverse=True)


def load_newest_intact(run_folder: str, device: str | torch.device, say=print) -> tuple[dict, list[dict]] | None:
    """(state, history) of the newest checkpoint of the Ray Train run in `run_folder` (a path or URI) that can be
    read; None when it has no checkpoint.

    Every checkpoint folder of the run counts, not only those that Ray Train's controller registered (its
    `get_checkpoint`): a worker writes its checkpoint out first, and the controller registers it only at its
    next poll (every 0.5 s in a job, cliptime.runtime.TRAIN_POLL_SECONDS), so a job stopped in between would
    resume from an older checkpoint, or from scratch (tests/test_recovery.py). A checkpoint that cannot be read
    (a crash while it was written out, a damaged disk) is passed over for the one before, and `say` tells the
    person so. Checkpoint folders are named by the time Ray made them."""
    fs, newest_first = checkpoint_folders(run_folder)
    for path in newest_first:
        try:
            loaded = load_checkpoint(ray.train.Checkpoint(path, fs), device)
        except UNREADABLE_CHECKPOINT as e:
            say(f"warning: checkpoint {path} is damaged ({type(e).__name__}); trying the one before")
            continue
        if path != newest_first[0]:
            say(f"resuming from {path} (epoch {loaded[0]['epoch']})")
        return loaded
    if newest_first:
        raise CliptimeError(f"no checkpoint of {run_folder} can be read; start the run anew under another --name")
    return None


def initial_weights(location: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The model weights of checkpoint folder `location` (`--init-from`: a path or a URI); a folder that is no
    checkpoint is one line naming it."""
    if "://" not in location:
        location = str(Path(location).expanduser().resolve())
    fs, path = pyarrow.fs.FileSystem.from_uri(location)
    try:
        state, _ = load_checkpoint(ray.train.Checkpoint(path, fs), device)
    except UNREADABLE_CHECKPOINT as e:
        raise CliptimeError(f"--init-from {location}: not a readable checkpoint folder ({type(e).__name__})") from None
    return state["model"]


def check_initial_weights(task: Task, location: str) -> None:
    """`--init-from` checked on the driver before any worker starts: the folder holds a checkpoint of a model of
    the task's shape (else one line naming it)."""
    weights = initial_weights(location)
    try:
        task.build_model(load_pretrained=False).load_state_dict(weights)
    except RuntimeError as e:  # load_state_dict: missing, unexpected or differently shaped weights
        raise CliptimeError(
            f"--init-from {location}: its weights do not fit this {task.name} model ({str(e).splitlines()[0]})"
        ) from None


def read_history(checkpoint: ray.train.Checkpoint) -> list[dict]:
    """The metrics of every epoch up to the checkpoint's, each with the time it ended (EPOCH_ENDED)."""
    with checkpoint.as_directory() as d:
        return json.loads((Path(d) / HISTORY_FILE).read_text())


def load_checkpoint_model(task: Task, checkpoint: ray.train.Checkpoint, device: str = "cpu") -> torch.nn.Module:
    model = task.build_model(load_pretrained=False)
    state, _ = load_checkpoint(checkpoint, device)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


# -- the loop, on every worker --------------------------------------------------------------------------------
def use_cpus(n: int) -> None:
    """Train on `n` CPU threads: exactly the CPUs a worker reserved (more would steal Ray Data's, fewer would idle
    them), with denormal floats flushed to zero: as weights train, activations and gradients hold more denormals,
    which x86 cores handle far slower."""
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> tuple[list, torch.optim.Optimizer]:
    """(the trained parameters, their AdamW optimizer with `tc`'s settings)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig, steps_per_epoch: int):
    """Linear warm-up over `warmup_fraction` of all steps, then cosine decay."""
    total = max(1, steps_per_epoch * tc.epochs)
    warmup = max(1, int(tc.warmup_fraction * total))
    return torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup)),
        ],
        milestones=[warmup],
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    task = make_task(config["task"], config["task_config"])
    tc = from_dict(TrainConfig, config["train_config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    messages: Messages = config["messages"] if rank == 0 else Messages()  # one voice per run: rank 0's
    if device.type == "cpu":
        use_cpus(tc.cpus_per_worker)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank

    module = task.build_model()
    model = ray.train.torch.prepare_model(module)  # moved to the device; DDP-wrapped with several workers
    if tc.compile:
        model = torch.compile(model)  # shares its parameters with `module`, which checkpoints save
    params, optimizer = make_optimizer(model, tc)
    scheduler = make_scheduler(optimizer, tc, config["steps_per_epoch"])
    start_epoch, history = 0, []
    if resumed := load_newest_intact(config["run_folder"], device, messages.say):
        state, history = resumed
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
    elif tc.init_from:
        module.load_state_dict(initial_weights(tc.init_from, device))  # its shape checked by `fit`

    amp = tc.use_gpu and tc.amp
    amp_dtype = getattr(torch, tc.amp_dtype)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp)  # noqa: E731
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)  # fp16 needs scaling
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")
    # --batch-size is the global batch of one optimizer step: world x grad_accum micro-batches
    per_worker_batch = tc.batch_size // (world * tc.grad_accum)
    for epoch in range(start_epoch, tc.epochs):
        started = time.time()
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
                with autocast():
                    loss, parts = task.loss(model, task.train_transform(batch), epoch, tc.epochs)
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
                messages.step(epoch, steps, loss, steps * tc.batch_size / (time.time() - started))
            fetch_started = time.time()
        train_seconds = time.time() - started
        metrics = {
            "epoch": epoch,
            "lr": scheduler.get_last_lr()[0],
            # the share of the epoch the step waited for its batch: what the data pipeline costs the model
            "data_wait_fraction": waited / train_seconds,
            "step_seconds": train_seconds - waited,  # time in training steps: what the job's overhead is set against
            "samples_per_second": steps * tc.batch_size / train_seconds,  # global: every worker runs as many steps
            **{f"train/{k}": float(v) / max(steps, 1) for k, v in sums.items()},
        }
        saved = None
        if rank == 0:
            validation_started = time.time()
            with autocast():
                val_metrics = task.validate(module, val_data.iter_torch_batches(batch_size=EVAL_BATCH, device=device))
            metrics.update({f"val/{k}": v for k, v in val_metrics.items()})
            metrics["val_seconds"] = time.time() - validation_started  # a part of the job's overhead
            # not a metric: when the epoch ended, so that a resumed job's seconds count only the epochs it trained
            history.append({**metrics, EPOCH_ENDED: time.time()})
            state = {
                "model": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
            }
            saved = save_checkpoint(Path(tempfile.mkdtemp(prefix="cliptime-checkpoint-")), state, history)
            messages.epoch(epoch_line(epoch, tc.epochs, steps, time.time() - started, waited, metrics))
        # The copy to storage (a bucket, on a cluster) runs beside the next epoch's steps instead of before them:
        # Ray copies in a thread of this worker, deletes the local folder once copied, and waits for the last copy
        # before the run ends. A job stopped mid-copy leaves a partial folder, which a resume passes over.
        ray.train.report(metrics, checkpoint=saved, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)


def epoch_line(epoch: int, epochs: int, steps: int, seconds: float, waited: float, metrics: dict) -> str:
    """The epoch's line: the first EPOCH_LINE_METRICS validation metrics in the order the task's `validate` gives
    them (its headline first), the training loss and the throughput. Every metric is in MLflow."""
    shown = [k for k in metrics if k.startswith("val/")][:EPOCH_LINE_METRICS]
    values = " ".join(f"{k} {metrics[k]:.4g}" for k in shown)
    return (
        f"epoch {epoch + 1}/{epochs} ({steps} steps, {seconds:.0f} s): {values} | train/loss "
        f"{metrics['train/loss']:.4g} | {metrics['samples_per_second']:.0f} samples/s, {waited:.0f} s waiting for data"
    )


# -- the trainer ----------------------------------------------------------------------------------------------
def fit(
    task: Task,
    tc: TrainConfig,
    datasets: dict[str, ray.data.Dataset],
    steps_per_epoch: int,
    name: str,
    storage_path: str,
    callbacks: list,
    messages: Messages | None = None,
) -> ray.train.Result:
    """Train `task` as Ray Train run `name` under `storage_path` (resuming it if it holds checkpoints). With
    `messages` on a queue (`console.new_messages`), the epochs' progress is shown here, at the driver; without,
    rank 0 prints its epoch lines where it runs."""
    messages = messages or Messages()
    _, resumed_from = checkpoint_folders(joined(storage_path, name))
    if tc.init_from and not resumed_from:  # a wrong folder fails here in one line, not in every worker
        check_initial_weights(task, tc.init_from)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "task": task_ref(task),
            "task_config": asdict(task.cfg),
            "train_config": asdict(tc),
            "steps_per_epoch": steps_per_epoch,
            "run_folder": joined(storage_path, name),  # where Ray Train keeps the run's checkpoints
            "messages": messages,
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
        datasets=datasets,
        # Several workers each read their part of the train split through a coordinator actor; one worker reads
        # all of it itself, the same batches without the coordinator's process to start and feed
        dataset_config=DataConfig(datasets_to_split=["train"] if tc.num_workers > 1 else []),
    )
    try:
        shown = follow(messages, tc.epochs, steps_per_epoch) if messages.queue is not None else contextlib.nullcontext()
        with handlers_kept(signal.SIGINT), shown:
            return trainer.fit()
    except SystemExit:
        # Ctrl-C (or SIGTERM, see cliptime.cli) in a driver: Ray Train's handler aborts the run's workers and
        # then exits with status 0. The run is stopped, not done: to the job it is an interrupt.
        raise KeyboardInterrupt from None
