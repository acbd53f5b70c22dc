"""Data-path throughput per CPU core at the sizes users train at: decode and batch-to-tensor in Ray Data, augment.

    python benchmarks/ingest.py                    # 224-px images, photos, 10-s 48-kHz clips; Ray with 1, then 2 CPUs
    python benchmarks/ingest.py --cpus 1 --sequences 7 --frames 4 --pairs 4 --photos 14 --repeats 1 --warmups 1

Can a GPU node's CPUs feed ViT-B/32 (224-px images) and HTSAT (10-s 48-kHz clips)? For each `--cpus` N, a new
process starts a fresh local Ray with N CPUs (`cliptime.runtime.start_local_ray`); the first writes three data sets
as shards, before anything is timed:
  images: the CLIPTime generator at `--image-size` (`cliptime.convert.write_generated_shards`, as
          `make_shards.py cliptime OUT --image-size 224` does), read by `--model`;
  photos: JPEG camera photos (1024 x 768, sensor noise) made from those images with PIL, through the time-lapse
          converter (`make_shards.py timelapse`), which stores them center-cropped at the model's size;
  clips:  the T-CLAP generator for `--audio-model` HTSAT-tiny, whose config takes 10-s clips at 48 kHz.
Each process then times, per data set, the project's own path:
  decode: `cliptime.pipeline.prepare` (every shard checked, read, decoded by the task's `preprocessor()`,
          materialized), rows of all splits over its wall time;
  epoch:  `cliptime.pipeline.training_datasets` (block shuffle) read as a training worker reads it
          (`iter_torch_batches` with cliptime.train's local shuffle buffer), train rows over the epoch's wall time,
          from creating the iterator to its last batch, the augmentation's time left out;
  augment: the task's `train_transform`, which the training step runs on its device, timed on each epoch batch on
          the device the batches go to (here the CPU: what a CPU-only worker pays; a GPU pays a fraction of it).
Steady state: Ray starts before the clock, and `--warmups` untimed `prepare` runs and epochs come first: Ray Data's
workers start and import the task's modules, and the memory the data passes through (the object store, the workers'
heaps) is touched for the first time. That first touch is the machine's cost, not the data path's, and on a virtual
machine whose host backs guest memory only when it is first written it dwarfs the rest: the benchmark measures it
(`memory_write_seconds_per_gib`, a GiB written once and again, before anything else) and reports the first
`prepare` beside the timed ones. Epochs are timed whole, not from their first batch: the first batch
waits for the shuffle buffer (8 batches) to fill, so timing from it would count rows made before the clock started.
`decode + epoch` is what one item costs from shard to tensor (1 / (1/decode + 1/epoch)); the headline figures
per core are its lowest over the CPU settings. Per core: divided by the N CPUs Ray Data had; the reading process
(a training worker's own CPUs) is outside them, and its CPU time per item is reported beside. Figures are means
over `--repeats` timed runs, with their sample standard deviation. Target: ~1,000 images/s and >= 300 clips/s per
core, per-core figures within 15% of each other at 1 and 2 CPUs.
Results: benchmarks/results/ingest-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine, markdown_table, mean_std, over_seeds, today, write_results

PHOTO_SIZE = (1024, 768)  # a camera's 4:3 frame, which the converter center-crops and resizes
PHOTO_NOISE = 3.0  # sensor noise, standard deviation in 8-bit levels: photos are not as smooth as the generator's
KINDS = ("images", "photos", "clips")
TARGETS = {"images": 1000.0, "photos": 1000.0, "clips": 300.0}  # items per second per core (issue #19)
SCALING_TOLERANCE = 0.15  # per-core figures at every CPU setting within this of each other


def task_settings(kind: str, args: argparse.Namespace) -> tuple[str, dict]:
    """(task name, config settings) that read data set `kind` as training would."""
    if kind == "clips":
        return "tclap", {"audio_model": args.audio_model}
    return "cliptime", {"model": args.model}


def write_images(folder: Path, args: argparse.Namespace) -> None:
    """The CLIPTime generator's data set at `--image-size`: `--sequences` colonies of `--frames` frames."""
    from cliptime.convert import write_generated_shards
    from cliptime.tasks import make_task

    sizes = {"sequences": args.sequences, "frames": args.frames, "image_size": args.image_size}
    write_generated_shards(make_task("cliptime", {**sizes, "model": args.model}), folder)


def write_photos(images: Path, folder: Path, args: argparse.Namespace) -> None:
    """`--photos` of the generated frames (evenly spaced over all colonies) as JPEG camera photos in one folder per
    colony with a manifest of stage and hours, converted by the time-lapse converter at the model's size."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from cliptime.convert import write_user_shards
    from cliptime.data.timelapse import MANIFEST, TimelapseConfig
    from cliptime.tasks.cliptime import CLIPTimeTask

    columns = ["image", "stage", "hours", "sequence", "frame"]
    frames = pq.read_table(sorted(images.glob("*/*.parquet")), columns=columns).to_pylist()
    rng = np.random.default_rng(0)
    photos_dir = folder.parent / f"{folder.name}-jpeg"
    photos_dir.mkdir()
    with open(photos_dir / MANIFEST, "w", newline="") as f:
        manifest = csv.writer(f)
        manifest.writerow(["path", "stage", "hours"])
        for row in frames[:: max(1, len(frames) // args.photos)][: args.photos]:
            pixels = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB").resize(PHOTO_SIZE, Image.BICUBIC))
            noisy = np.clip(pixels + rng.normal(0.0, PHOTO_NOISE, pixels.shape), 0, 255).astype(np.uint8)
            path = Path(row["sequence"]) / f"{row['frame']:04d}.jpg"
            (photos_dir / path.parent).mkdir(exist_ok=True)
            Image.fromarray(noisy).save(photos_dir / path, quality=90)
            manifest.writerow([path, row["stage"], row["hours"]])
    write_user_shards(CLIPTimeTask, "timelapse", photos_dir, folder, TimelapseConfig(model=args.model))


def write_clips(folder: Path, args: argparse.Namespace) -> None:
    """The T-CLAP generator's clips for `--audio-model`: `--pairs` event pairs in both orders and half as many
    single events for training; the held-out splits at the task's tiny preset."""
    from cliptime.convert import write_generated_shards
    from cliptime.tasks import make_task
    from cliptime.tasks.tclap import TCLAPTask

    sizes = {**TCLAPTask.data_sizes, "train_pairs": args.pairs, "train_singles": args.pairs // 2}
    write_generated_shards(make_task("tclap", {**sizes, "audio_model": args.audio_model}), folder)


def memory_write_seconds_per_gib() -> dict:
    """Seconds to write a GiB this process never had (`first`: page faults, and a host's backing of them on a virtual
    machine that backs guest memory lazily), then the same GiB again (`again`: the memory's own speed)."""
    import numpy as np

    gib = np.empty(2**30, dtype=np.uint8)
    seconds = {}
    for when, value in (("first", 1), ("again", 2)):
        started = time.perf_counter()
        gib.fill(value)
        seconds[when] = time.perf_counter() - started
    return seconds


def time_kind(task, repeats: int, warmups: int, batch_size: int, device: str) -> dict:
    """Seconds of `prepare` and of training epochs of `task`'s shards, `repeats` of each after `warmups` untimed."""
    import torch

    from cliptime.pipeline import prepare, steps_per_epoch, training_datasets
    from cliptime.train import SHUFFLE_BATCHES

    decode_seconds = []
    for _ in range(warmups + repeats):
        started = time.perf_counter()
        data = prepare(task)
        decode_seconds.append(time.perf_counter() - started)
    steps_per_epoch(data, batch_size)  # at least one batch, or the error that says so
    train = training_datasets(data, seed=0)["train"]
    epoch_seconds, consumer_cpu_seconds, augment_seconds, train_rows = [], [], [], 0
    for epoch in range(warmups + repeats):
        started, cpu_started, train_rows = time.perf_counter(), time.process_time(), 0
        augmenting, augmenting_cpu = 0.0, 0.0  # wall and CPU time (all threads) of the device augmentation
        batches = train.iter_torch_batches(
            batch_size=batch_size,
            device=device,
            drop_last=True,
            local_shuffle_buffer_size=SHUFFLE_BATCHES * batch_size,
            local_shuffle_seed=epoch,
        )
        for batch in batches:
            train_rows += len(next(iter(batch.values())))
            if device == "cuda":
                torch.cuda.synchronize()  # the batch's copy to the device is the data path's, not the augmentation's
            augment_started, augment_cpu_started = time.perf_counter(), time.process_time()
            data.task.train_transform(batch)
            if device == "cuda":
                torch.cuda.synchronize()
            augmenting += time.perf_counter() - augment_started
            augmenting_cpu += time.process_time() - augment_cpu_started
        epoch_seconds.append(time.perf_counter() - started - augmenting)
        consumer_cpu_seconds.append(time.process_time() - cpu_started - augmenting_cpu)
        augment_seconds.append(augmenting)
    return {
        "rows": sum(data.rows.values()),
        "train_rows": train_rows,
        "decode_seconds": decode_seconds[warmups:],
        "epoch_seconds": epoch_seconds[warmups:],
        "consumer_cpu_seconds": consumer_cpu_seconds[warmups:],
        "augment_seconds": augment_seconds[warmups:],
        "warmup_seconds": {"decode": decode_seconds[:warmups], "epoch": epoch_seconds[:warmups]},
    }


def measure(work: Path, cpus: int, args: argparse.Namespace) -> dict:
    """Every data set under `work` timed on a fresh local Ray with `cpus` CPUs (this process's own); the data sets
    written there first if they are not there yet (one Ray start fewer than a Ray of their own)."""
    import torch

    from cliptime.runtime import start_local_ray
    from cliptime.tasks import make_task, task_class

    start_local_ray(cpus, log_to_driver=False)
    if not (work / "images").is_dir():  # the first setting writes the data sets, before its own warm-up
        write_images(work / "images", args)
        if args.photos:
            write_photos(work / "images", work / "photos", args)
        write_clips(work / "clips", args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timings = {"device": device}
    for kind in KINDS:
        if (work / kind).is_dir():
            name, settings = task_settings(kind, args)
            batch_size = args.batch_size or task_class(name).train_config().batch_size
            task = make_task(name, {"data": str(work / kind), **settings})
            timed = time_kind(task, args.repeats, args.warmups, batch_size, device)
            timings[kind] = {"batch_size": batch_size, **timed}
    return timings


def summarize(timed: dict, cpus: int) -> dict:
    """Items per second (all, per core) of each timed run: decode, epoch and both; mean, spread and the runs."""
    runs = []
    seconds = ("decode_seconds", "epoch_seconds", "consumer_cpu_seconds", "augment_seconds")
    for decode_s, epoch_s, cpu_s, augment_s in zip(*(timed[k] for k in seconds)):
        rates = {"decode": timed["rows"] / decode_s, "epoch": timed["train_rows"] / epoch_s}
        rates["decode_and_epoch"] = 1 / (1 / rates["decode"] + 1 / rates["epoch"])
        runs.append(
            {
                **{f"{k}_per_second": v for k, v in rates.items()},
                **{f"{k}_per_second_per_core": v / cpus for k, v in rates.items()},
                "consumer_cpu_ms_per_item": 1000 * cpu_s / timed["train_rows"],
                "augment_ms_per_item": 1000 * augment_s / timed["train_rows"],
            }
        )
    warmups = timed["warmup_seconds"]["decode"]
    first_decode = timed["rows"] / warmups[0] / cpus if warmups else None
    return {"cpus": cpus, **timed, **over_seeds(runs), "first_decode_per_second_per_core": first_decode}


def headline(results: dict, kind: str) -> float | None:
    """The lowest decode+epoch figure per core over the CPU settings (None: `kind` was not measured)."""
    figures = [r[kind]["decode_and_epoch_per_second_per_core"]["mean"] for r in results.values() if kind in r]
    return min(figures) if figures else None


def scaling(results: dict, kind: str) -> float | None:
    """Per-core decode+epoch at the most CPUs over that at the fewest (1.0: linear scaling)."""
    figures = [r[kind]["decode_and_epoch_per_second_per_core"]["mean"] for r in results.values() if kind in r]
    return figures[-1] / figures[0] if len(figures) > 1 else None


def markdown(payload: dict) -> str:
    rows, memory = [], payload["memory_write_seconds_per_gib"]
    for by_cpus in payload["results"].values():
        for kind in KINDS:
            if kind in by_cpus:
                r = by_cpus[kind]
                rows.append(
                    [
                        kind,
                        str(by_cpus[kind]["cpus"]),
                        f"{r['rows']} ({r['train_rows']} train)",
                        str(r["batch_size"]),
                        mean_std(r["decode_per_second"], 0),
                        mean_std(r["decode_per_second_per_core"], 0),
                        "-"
                        if r["first_decode_per_second_per_core"] is None
                        else f"{r['first_decode_per_second_per_core']:.0f}",
                        mean_std(r["epoch_per_second"], 0),
                        mean_std(r["epoch_per_second_per_core"], 0),
                        mean_std(r["decode_and_epoch_per_second_per_core"], 0),
                        mean_std(r["consumer_cpu_ms_per_item"], 2),
                        mean_std(r["augment_ms_per_item"], 2),
                    ]
                )
    header = ["data", "Ray CPUs", "rows", "batch", "decode items/s", "per core", "first decode, per core"]
    header += ["epoch items/s", "per core"]
    header += ["decode + epoch, per core", "reader CPU ms/item", f"augment on {payload['device']}, ms/item"]
    summary = [
        [
            kind,
            f"{payload[f'{kind}_per_second_per_core']:.0f}",
            f"{TARGETS[kind]:.0f}",
            "-" if payload["scaling"][kind] is None else f"{payload['scaling'][kind]:.2f}",
        ]
        for kind in KINDS
        if payload[f"{kind}_per_second_per_core"] is not None
    ]
    return "\n".join(
        [
            f"# Ingest benchmark, {payload['date']}",
            "",
            f"Command: `{payload['command']}`  ",
            f"Machine: {payload['machine']}; batches to {payload['device']}  ",
            f"Memory: a GiB written for the first time in {memory['first']:.2f} s, again in {memory['again']:.2f} s  ",
            f"Data: {payload['data']}",
            "",
            "Items per second through `prepare` (decode), a training epoch (`training_datasets` -> "
            "`iter_torch_batches`: block shuffle, local shuffle, tensors) and both (an item's whole cost); the "
            "training step's augmentation (`train_transform`) on the batches' device beside; "
            f"means ± standard deviation over {payload['repeats']} timed runs after {payload['warmups']} untimed; "
            "the first (untimed) decode beside them.",
            "",
            markdown_table(header, rows),
            "",
            "Decode + epoch per core, the lowest over the CPU settings, against the target, and how the per-core "
            f"figure holds from the fewest to the most CPUs (within {SCALING_TOLERANCE:.0%} of 1.0 is the target):",
            "",
            markdown_table(["data", "per core", "target", "most / fewest CPUs"], summary),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="Ray Data CPUs, a fresh Ray each")
    parser.add_argument("--sequences", type=int, default=30, help="generated colonies (images)")
    parser.add_argument("--frames", type=int, default=100, help="frames per colony (images)")
    parser.add_argument("--image-size", type=int, default=224, help="generated image size in pixels")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model that reads the images and photos")
    parser.add_argument("--photos", type=int, default=600, help="JPEG photos, time-lapse converter (0: none)")
    parser.add_argument("--pairs", type=int, default=200, help="T-CLAP training event pairs (clips: 2.5 per pair)")
    parser.add_argument("--audio-model", default="HTSAT-tiny", help="CLAP audio config: its clip length and rate")
    parser.add_argument("--batch-size", type=int, default=0, help="rows per training batch (0: the task's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed prepare runs and epochs")
    parser.add_argument("--warmups", type=int, default=3, help="untimed prepare runs and epochs before the timed")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--measure-in", help=argparse.SUPPRESS)  # internal: time the shards in this folder, print
    parser.add_argument("--measure-cpus", type=int, help=argparse.SUPPRESS)  # internal: on a Ray with these CPUs
    args = parser.parse_args()
    if args.measure_in:
        print(json.dumps(measure(Path(args.measure_in), args.measure_cpus, args)))
        return

    shown = {k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in vars(args).items()}
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in shown.items() if k != "out" and not k.startswith("measure")]
    command = "python benchmarks/ingest.py " + " ".join(flags)
    memory = memory_write_seconds_per_gib()  # before Ray and the data sets take memory of their own
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cpus in args.cpus:  # each setting a process of its own, with a fresh Ray
            proc = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--measure-in", tmp, "--measure-cpus", str(cpus)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                sys.exit(f"measuring with {cpus} CPUs failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            timings = json.loads(proc.stdout.strip().splitlines()[-1])
            device = timings.pop("device")
            results[str(cpus)] = {kind: summarize(timed, cpus) for kind, timed in timings.items()}
    when = today()
    payload = {
        "date": when,
        "machine": machine(),
        "command": command,
        "device": device,
        "repeats": args.repeats,
        "warmups": args.warmups,
        "memory_write_seconds_per_gib": memory,
        "data": (
            f"{args.sequences} x {args.frames} generated images at {args.image_size} px and {args.photos} JPEG photos "
            f"for {args.model}; T-CLAP clips of {args.pairs} pairs for {args.audio_model}"
        ),
        **{f"{kind}_per_second_per_core": headline(results, kind) for kind in KINDS},
        "scaling": {kind: scaling(results, kind) for kind in KINDS},
        "results": results,
    }
    written = write_results(args.out, f"ingest-{when}", payload, markdown(payload))
    print(json.dumps({"written": str(written), **{k: v for k, v in payload.items() if k.endswith("per_core")}}))


if __name__ == "__main__":
    main()
