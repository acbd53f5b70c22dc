"""What every job shares: flags from the dataclass configs, one-line errors, a JSON object as the last line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable

import ray

from cliptime.config import TrainConfig, add_dataclass_args, from_namespace
from cliptime.convert import CONVERTERS, convert_config
from cliptime.errors import CliptimeError
from cliptime.tasks import TASKS


def user_error(e: BaseException) -> CliptimeError | None:
    """The CliptimeError behind `e`, also when it was raised inside a Ray task or worker."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, CliptimeError):
            return e
        e = getattr(e, "cause", None) or e.__cause__
    return None


def run_job(job: Callable[[], object]) -> int:
    """Run `job`; print its result's JSON as the last stdout line (exit 0) or a one-line error (exit 2)."""
    try:
        result = job()
    except Exception as e:
        error = user_error(e)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        # Flush what Ray's workers still have to print before the final JSON line.
        ray.shutdown()
    payload = result if isinstance(result, dict) else dataclasses.asdict(result)
    print(json.dumps(payload, sort_keys=True, default=str), flush=True)
    return 0


def train_main(task_name: str, description: str, argv: list[str] | None = None) -> int:
    task_cls = TASKS[task_name]
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, task_cls.Config, f"{task_name} task")
    add_dataclass_args(parser, TrainConfig, "training, scale and tracking")
    parser.set_defaults(**task_cls.train_defaults)
    args = parser.parse_args(argv)

    def job():
        from cliptime import train

        return train.run(task_cls(from_namespace(task_cls.Config, args)), from_namespace(TrainConfig, args))

    return run_job(job)


GENERATORS = {"fungal": "cliptime", "sounds": "tclap"}  # make_shards subcommand -> task


def make_shards_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a data set as Parquet shards (train/val/test + manifest.json): a task's generated "
        "set, or the user's own time-lapse photos or ESC-50-layout sounds.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for command, task_name in GENERATORS.items():
        task_cls = TASKS[task_name]
        sub = commands.add_parser(command, help=f"the {task_name} task's generated data set")
        sub.add_argument("out_dir", help="output directory (written atomically)")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        add_dataclass_args(sub, task_cls.Config, f"{task_name} data")
    for command, (task_name, metavar, what) in CONVERTERS.items():
        sub = commands.add_parser(command, help=f"{what} -> {task_name} shards")
        sub.add_argument("input_dir", metavar=metavar, help=what)
        sub.add_argument("out_dir", help="output directory (written atomically)")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        sub.add_argument(
            "--skip-bad", action="store_true", help="skip unreadable files and bad rows, and report them, not stop"
        )
        add_dataclass_args(sub, convert_config(command), f"{command} conversion")
    args = parser.parse_args(argv)

    def job():
        from cliptime.convert import write_user_shards
        from cliptime.data.shards import write_shards
        from cliptime.train import init_ray

        if args.command in CONVERTERS:
            cfg = from_namespace(convert_config(args.command), args)
            return write_user_shards(
                args.command, args.input_dir, args.out_dir, cfg, skip_bad=args.skip_bad, overwrite=args.overwrite
            )
        task_cls = TASKS[GENERATORS[args.command]]
        task = task_cls(from_namespace(task_cls.Config, args))
        task.check()
        init_ray()
        manifest = write_shards(
            task.generate(),
            args.out_dir,
            task=task.name,
            label=task.label_column,
            source=task.source(),
            overwrite=args.overwrite,
        )
        return {"out_dir": args.out_dir, "manifest": manifest}

    return run_job(job)


def tune_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Sweep a task's hyperparameters with Ray Tune (OptunaSearch + ASHA) from a tune_spaces/ "
        "YAML file; register the best model and move the alias `champion` to it if it beats the current one.",
    )
    parser.add_argument("space", help="search-space YAML file, e.g. tune_spaces/cliptime-quick.yaml")
    parser.add_argument("--storage-path", default="~/ray_results", help="where trials and checkpoints go")
    parser.add_argument("--experiment", default="cliptime-sweeps", help="MLflow experiment of the sweep runs")
    parser.add_argument("--name", default="", help="sweep name (default: sweep-<task>-<timestamp>)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default="",
        help="finish an interrupted sweep (by name, or the latest of the file's task)",
    )
    args = parser.parse_args(argv)

    def job():
        from cliptime.tune import sweep

        return sweep(args.space, args.storage_path, args.experiment, args.resume, args.name)

    return run_job(job)


def predict_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Predict with a registered cliptime model. CLIPTime: an image (stage, class probabilities, "
        "hours) or a folder of images (a Parquet/CSV table, computed with Ray Data). T-CLAP: an audio file with "
        "candidate captions (ranked) or --order A B (which order the clip plays).",
    )
    parser.add_argument("model", help="model URI, e.g. models:/cliptime-fungal@champion or models:/tclap/1")
    parser.add_argument("input", help="image file or folder (CLIPTime); WAV/FLAC file (T-CLAP)")
    parser.add_argument("--caption", default="", help="CLIPTime: the photo's description (default: none)")
    parser.add_argument("--out", default="", help="CLIPTime folders: output .parquet or .csv")
    parser.add_argument("--captions", nargs="+", default=[], help="T-CLAP: candidate captions to rank")
    parser.add_argument("--order", nargs=2, metavar=("A", "B"), help="T-CLAP: two events; which plays first?")
    args = parser.parse_args(argv)

    def job():
        from pathlib import Path

        from cliptime import predict

        path = Path(args.input)
        if not path.exists():
            raise CliptimeError(f"input {path} does not exist")
        _, task = predict.load(args.model)
        if task.name == "cliptime":
            if args.captions or args.order:
                raise CliptimeError(f"{args.model} is a CLIPTime model: --captions and --order are for T-CLAP")
            return predict.predict_cliptime(args.model, path, args.caption, Path(args.out) if args.out else None)
        if args.caption or args.out:
            raise CliptimeError(f"{args.model} is a T-CLAP model: --caption and --out are for CLIPTime")
        return predict.predict_tclap(args.model, path, args.captions, args.order)

    return run_job(job)
