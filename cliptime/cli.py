"""What every job shares: flags from the dataclass configs, one-line errors, a JSON object as the last line.

Nothing here names a task: each command is built from the tasks' own configs, converters and prediction flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

import ray

from cliptime.config import TrainConfig, add_dataclass_args, from_namespace
from cliptime.errors import CliptimeError, Interrupted, find_cause
from cliptime.tasks import TASKS, task_class


def user_error(e: BaseException) -> CliptimeError | None:
    """The CliptimeError behind `e`, also when it was raised inside a Ray task or worker."""
    return find_cause(e, lambda cause: isinstance(cause, CliptimeError))


def stop_as_ctrl_c(signum: int, frame) -> None:
    """A SIGTERM handler: run the SIGINT handler in force (Python's raises KeyboardInterrupt; Ray Tune's and Ray
    Train's stop their run gracefully), or raise KeyboardInterrupt where SIGINT is ignored or left to the system.
    The handler is called, not sent SIGINT: a process whose SIGINT is ignored (a script's background job) or
    blocked (the entrypoint of `ray job submit`: Ray blocks SIGINT in its processes) would never get it."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def run_job(job: Callable[[], object]) -> int:
    """Run `job`; print its result's JSON as the last stdout line (exit 0) or a one-line error (exit 2; 130 for a
    job stopped by Ctrl-C or SIGTERM)."""
    ray_was_up = ray.is_initialized()
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        # SIGTERM (a scheduler's stop, `kill`, `ray job stop`) stops a job as Ctrl-C does: runs marked KILLED, state
        # kept for --resume.
        on_sigterm = signal.signal(signal.SIGTERM, stop_as_ctrl_c)
    try:
        result = job()
    except Exception as e:
        error = user_error(e)
        if error is None:
            raise
        print(f"{'stopped' if isinstance(error, Interrupted) else 'error'}: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, on_sigterm)
        # Flush what Ray's workers still have to print before the final JSON line (a Ray that was up before the
        # job, as in an embedding program or a test session, is left running).
        if not ray_was_up:
            ray.shutdown()
    if hasattr(result, "summary"):
        print("\n".join(result.summary()), flush=True)
    payload = result if isinstance(result, dict) else dataclasses.asdict(result)
    print(json.dumps(payload, sort_keys=True, default=str), flush=True)
    return 0


def exit_process(code: int) -> NoReturn:
    """End a job script's process with `code`, without the garbage collector's passes over every object still
    alive at exit (torch, Ray, MLflow and the rest of a job's heap; they took 2.4-3.2 s of the 4.7-5.2 s between
    a job's JSON line and its exit here: benchmarks/results/job-exit-2026-12-07.md). The process's memory goes
    back with it; the atexit handlers (logging's, MLflow's, Ray's) and the flushing of stdout and stderr still
    run. A file left open in a reference cycle would no longer be flushed by its collection: the job closes its
    files itself. For the scripts only: frozen objects are never collected, which a process that goes on (a test
    session) would feel."""
    gc.freeze()
    sys.exit(code)


def train_parser(task_name: str, description: str = "") -> argparse.ArgumentParser:
    """`jobs/train_<task>.py`'s flags: the task's settings, then training; defaults are the task's presets."""
    task_cls = task_class(task_name)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, task_cls.Config, f"{task_cls.title} task")
    add_dataclass_args(parser, TrainConfig, "training, scale and tracking")
    parser.set_defaults(**dataclasses.asdict(task_cls.train_config()))
    add_verbose_arg(parser)
    return parser


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the logs of Ray, Ray Data and MLflow and what Ray's workers print (default: in the run's log file)",
    )


def train_main(task_name: str, description: str, argv: list[str] | None = None) -> int:
    task_cls = task_class(task_name)
    args = train_parser(task_name, description).parse_args(argv)

    def job():
        from cliptime.job import run

        task = task_cls(from_namespace(task_cls.Config, args))
        return run(task, from_namespace(TrainConfig, args), verbose=args.verbose)

    return run_job(job)


def make_shards_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a data set as Parquet shards (train/val/test + manifest.json): a task's generated "
        "set (`make_shards.py TASK OUT`), or your own files through a task's converter.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for task_cls in TASKS.values():
        sub = commands.add_parser(
            task_cls.name, aliases=list(task_cls.aliases), help=f"the {task_cls.title} task's generated data set"
        )
        sub.set_defaults(task=task_cls, converter=None)
        sub.add_argument("out_dir", help="output directory (written atomically)")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        add_dataclass_args(sub, task_cls.Config, f"{task_cls.title} data", only=task_cls.generated_fields)
        for kind, converter in task_cls.converters.items():
            sub = commands.add_parser(kind, help=f"{converter.help} -> {task_cls.title} shards")
            sub.set_defaults(task=task_cls, converter=kind)
            sub.add_argument("input_dir", metavar=converter.metavar, help=converter.help)
            sub.add_argument("out_dir", help="output directory (written atomically)")
            sub.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
            sub.add_argument(
                "--skip-bad", action="store_true", help="skip unreadable files and bad rows, and report them, not stop"
            )
            add_dataclass_args(sub, converter.Config, f"{kind} conversion")
    args = parser.parse_args(argv)

    def job():
        from cliptime.convert import write_generated_shards, write_user_shards

        task_cls = args.task
        if args.converter is None:
            task = task_cls(from_namespace(task_cls.Config, args))
            return write_generated_shards(task, args.out_dir, overwrite=args.overwrite)
        cfg = from_namespace(task_cls.converters[args.converter].Config, args)
        return write_user_shards(
            task_cls,
            args.converter,
            args.input_dir,
            args.out_dir,
            cfg,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
        )

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


def predict_parser() -> tuple[argparse.ArgumentParser, dict[str, dict]]:
    """(the parser, each task's own predict flags with their defaults)."""
    parser = argparse.ArgumentParser(
        description="Predict with a registered cliptime model: a file gives one JSON answer; a folder gives a "
        "table of predictions (Parquet or CSV, computed with Ray Data in batches).",
    )
    parser.add_argument("model", help="model URI, e.g. models:/cliptime@champion or models:/tclap/1")
    parser.add_argument("input", help="an input file, or a folder of them")
    parser.add_argument("--out", default="", help="folders: the output table, .parquet or .csv")
    defaults = {}
    for name, cls in TASKS.items():
        cls.add_predict_args(parser.add_argument_group(f"{cls.title} models"))
        own = argparse.ArgumentParser(add_help=False)
        cls.add_predict_args(own.add_argument_group())
        defaults[name] = vars(own.parse_args([]))
    return parser, defaults


def predict_main(argv: list[str] | None = None) -> int:
    parser, task_flags = predict_parser()
    args = parser.parse_args(argv)

    def job():
        from pathlib import Path

        from cliptime import predict

        path = Path(args.input)
        if not path.exists():
            raise CliptimeError(f"input {path} does not exist")
        task, model = predict.load(args.model)
        for other, defaults in task_flags.items():
            given = ["--" + k.replace("_", "-") for k, v in defaults.items() if getattr(args, k) != v]
            if other != task.name and given:
                verb = "is" if len(given) == 1 else "are"
                raise CliptimeError(
                    f"{args.model} is a {task.title} model: {' and '.join(given)} {verb} for {TASKS[other].title}"
                )
        return predict.predict(args.model, task, model, path, args)

    return run_job(job)


def serve_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Serve a registered cliptime model over HTTP on Ray Serve until Ctrl-C: POST /predict (the "
        "file as the body, the task's predict flags as query parameters, or JSON with base64 data), GET / (a page "
        "to drop a file on), GET /healthz, GET /model. serve/cliptime.yaml runs the same app with `serve run` or "
        "`serve deploy`.",
    )
    parser.add_argument("model", help="model URI, e.g. models:/cliptime@champion or models:/tclap/1")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=1, help="model replicas (Ray actors)")
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs per replica (its torch threads)")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (> 0: predict on the GPU)")
    parser.add_argument(
        "--reload-alias",
        type=float,
        default=0,
        metavar="SECONDS",
        help="re-read the URI's alias this often and swap in the version it names (0: never)",
    )
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests predicted together")
    parser.add_argument("--batch-wait-ms", type=float, default=10, help="how long a batch waits to fill")
    parser.add_argument("--max-bytes", type=int, default=32 << 20, help="the largest request body taken")
    args = parser.parse_args(argv)

    def job():
        from cliptime.serve import run

        return run({k: v for k, v in vars(args).items() if k not in ("host", "port")}, args.host, args.port)

    return run_job(job)
