"""What the benchmark scripts share: the machine they ran on, and how results are written."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # run as `python benchmarks/<script>.py` from a checkout


def machine() -> str:
    """CPU model and cores, and the GPU if torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}"


def today() -> str:
    return datetime.date.today().isoformat()


def write_results(out_dir: str | Path, stem: str, payload: dict, markdown: str) -> Path:
    """`stem.json` and `stem.md` under `out_dir`; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    return out / f"{stem}.json"


def run_job(script: str, flags: list[str], workdir: Path) -> tuple[float, dict]:
    """Run jobs/`script` with `flags` as a user would, MLflow and checkpoints in `workdir`; (seconds, metrics)."""
    cmd = [sys.executable, str(ROOT / "jobs" / script), "--storage-path", str(workdir / "ray_results"), *flags]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    seconds = time.time() - started
    if proc.returncode != 0:
        sys.exit(f"{script} {' '.join(flags)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return seconds, json.loads(proc.stdout.strip().splitlines()[-1])["metrics"]
