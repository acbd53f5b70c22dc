"""Serving speed: requests per second and p50/p99 latency of the Ray Serve app (cliptime/serve.py, as
`jobs/serve.py` runs it) at 1, 8 and 32 concurrent clients, against `task.predict` in this process on the same
inputs, one request at a time (what jobs/predict.py does per file) and in batches of --max-batch-size.

    python benchmarks/serve.py                                  # both tasks, the jobs' default model sizes
    python benchmarks/serve.py --task tclap --clients 1 8 --seconds 10
    python benchmarks/serve.py --tiny --seconds 2 --out /tmp/b  # a smoke run: the tests' tiny models

The models are registered untrained in a scratch store (speed does not depend on what a model learned). Inputs:
16 random-noise images of the model's input size (CLIPTime, no caption) or clips of its length (T-CLAP, `order`: two
captions per request). The replica and the in-process predict get the same torch threads (--num-cpus). The
clients run on the same machine as the server and take CPU from it: on a few cores the served figures are a lower
bound. The headline is the ratio of served requests/s to in-process predict one request at a time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import requests
from common import RESULTS, machine, today, write_results

from cliptime.tasks import TASKS
from cliptime.tasks.base import Task

INPUTS = 16


def inputs(task: Task) -> list[tuple[bytes, dict[str, list[str]]]]:
    """(body, query parameters) of each request: noise the model reads like any real input."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(INPUTS):
        buf = io.BytesIO()
        if task.name == "cliptime":
            with Image.open(io.BytesIO(task.input_example()["image"][0])) as example:
                size = example.size
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buf, format="PNG")
            out.append((buf.getvalue(), {}))
        else:
            a = task.model_audio
            sf.write(buf, rng.normal(0, 0.1, a["clip_samples"]).astype(np.float32), a["sample_rate"], format="WAV")
            out.append((buf.getvalue(), {"order": ["a ringing bell", "knocking"]}))
    return out


def summary(latencies: list[float], seconds: float) -> dict[str, float]:
    ms = sorted(1000 * t for t in latencies)
    return {
        "requests": len(ms),
        "requests_per_second": len(ms) / seconds,
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
    }


def in_process(task: Task, model, requests_: list, seconds: float, batch: int) -> dict[str, dict]:
    """task.predict on the same inputs: one request's rows per call, then `batch` requests' rows per call."""
    from cliptime.serve import task_args

    rows = [task.prediction_rows(body, task_args(task, params)) for body, params in requests_]
    for r in rows:  # warm-up: the first calls of each input size are slow (allocations, kernel choice)
        task.predict(model, r)
    task.predict(model, pd.concat(rows[:batch], ignore_index=True))
    one, started, i = [], time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        task.predict(model, rows[i % len(rows)])
        one.append(time.perf_counter() - t)
        i += 1
    result = {"one_request": summary(one, time.perf_counter() - started)}
    batches, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        task.predict(model, pd.concat([rows[(i + k) % len(rows)] for k in range(batch)], ignore_index=True))
        batches.append(time.perf_counter() - t)
        i += batch
    elapsed = time.perf_counter() - started
    result[f"batches_of_{batch}"] = {**summary(batches, elapsed), "requests_per_second": batch * len(batches) / elapsed}
    return result


def served(url: str, requests_: list, clients: int, seconds: float) -> dict[str, float]:
    """`clients` threads, each sending the next request as soon as its last is answered, for `seconds`."""
    answered: list[tuple[float, bool]] = []  # (latency, status 200): appended by every client thread
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        with requests.Session() as session:
            i = k
            while time.perf_counter() < stop:
                body, params = requests_[i % len(requests_)]
                t = time.perf_counter()
                ok = session.post(url, data=body, params=params, timeout=300).status_code == 200
                answered.append((time.perf_counter() - t, ok))
                i += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        **summary([t for t, _ in answered], elapsed),
        "errors": sum(not ok for _, ok in answered),
    }


def bench(task_name: str, args: argparse.Namespace, store: str, base_url: str) -> dict:
    import mlflow
    import torch
    from ray import serve

    from cliptime.predict import load
    from cliptime.registry import log_and_register
    from cliptime.serve import build

    cls = TASKS[task_name]
    task = cls.tiny() if args.tiny else cls(cls.Config())
    mlflow.set_tracking_uri(store)
    torch.manual_seed(0)
    with mlflow.start_run():
        version = log_and_register(task, task.build_model(load_pretrained=False).eval(), True, {})
    uri = f"models:/{task.name}/{version}"
    task, model = load(uri, store)
    requests_ = inputs(task)
    torch.set_num_threads(int(args.num_cpus))
    local = in_process(task, model, requests_, args.seconds, args.max_batch_size)

    settings = {"model": uri, "tracking": store, "num_cpus": args.num_cpus, "max_batch_size": args.max_batch_size}
    serve.run(build({**settings, "batch_wait_ms": args.batch_wait_ms}), name=task.name, route_prefix=f"/{task.name}")
    url = f"{base_url}/{task.name}/predict"
    served(url, requests_, 4, 2.0)  # warm-up
    levels = [served(url, requests_, c, args.seconds) for c in args.clients]
    serve.delete(task.name)
    one = local["one_request"]["requests_per_second"]
    for level in levels:
        level["over_in_process"] = level["requests_per_second"] / one
    return {"task": task.name, "model": "tiny" if args.tiny else "default", "in_process": local, "served": levels}


def markdown(rows: list[dict], command: str, when: str, where: str, batch: int) -> str:
    out = [
        f"# Serving benchmark, {when}",
        "",
        f"`{command}`",
        "",
        f"Machine: {where}",
        "",
        "| task | model | how | requests/s | p50 ms | p99 ms | / in-process one at a time | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for name, s in r["in_process"].items():
            how = f"in-process, {name.replace('_', ' ')}"
            ratio = s["requests_per_second"] / r["in_process"]["one_request"]["requests_per_second"]
            out.append(
                f"| {r['task']} | {r['model']} | {how} | {s['requests_per_second']:.1f} | {s['p50_ms']:.1f} "
                f"| {s['p99_ms']:.1f} | {ratio:.2f} | - |"
            )
        for s in r["served"]:
            how = f"served, {s['clients']} client{'s' * (s['clients'] > 1)}"
            out.append(
                f"| {r['task']} | {r['model']} | {how} | {s['requests_per_second']:.1f} | {s['p50_ms']:.1f} "
                f"| {s['p99_ms']:.1f} | {s['over_in_process']:.2f} | {s['errors']} |"
            )
    out += ["", f"In-process batch latencies are of a whole batch of {batch} requests."]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients, one run each")
    parser.add_argument("--seconds", type=float, default=20, help="measured time of each run")
    parser.add_argument("--num-cpus", type=float, default=os.cpu_count() or 1, help="the replica's CPUs and threads")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=10)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny models (smoke runs)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    tasks = list(TASKS) if args.task == "all" else [args.task]
    flags = [
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
    ]
    command = "python benchmarks/serve.py " + " ".join(f for f in flags if not f.startswith(("--out", "--tiny")))
    command += " --tiny" if args.tiny else ""

    from ray import serve

    from cliptime.runtime import free_port, init_ray

    when = today()
    payload = {"date": when, "machine": machine(), "command": command, "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        init_ray(reserved_cpus=int(args.num_cpus))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            for task in tasks:
                payload["results"].append(bench(task, args, store, f"http://127.0.0.1:{port}"))
                report = markdown(payload["results"], command, when, payload["machine"], args.max_batch_size)
                written = write_results(args.out, f"serve-{'-'.join(tasks)}-{when}", payload, report)
        finally:
            serve.shutdown()
    print(json.dumps({"written": str(written), "results": payload["results"]}))


if __name__ == "__main__":
    main()
