"""What the benchmark scripts share: the machine they ran on, and how results are written."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The test metrics of each task's tables (metric without its `test/` prefix -> column name), the headline first.
COLUMNS = {
    "cliptime": [
        ("accuracy_image_only", "image-only accuracy"),
        ("accuracy_grayscale", "grayscale"),
        ("accuracy_hue_shift", "hue-shifted"),
        ("time_mae_hours_image_only", "MAE h"),
        ("time_mae_hours_spore_image_only", "MAE spore"),
        ("time_mae_hours_hyphae_image_only", "MAE hyphae"),
        ("time_mae_hours_mycelium_image_only", "MAE mycelium"),
        ("spearman_spore_image_only", "rho spore"),
        ("spearman_hyphae_image_only", "rho hyphae"),
        ("spearman_mycelium_image_only", "rho mycelium"),
        ("accuracy", "accuracy with caption"),
    ],
    "tclap": [
        ("tclassify_a2t", "T-Classify a2t"),
        ("tclassify_t2a", "T-Classify t2a"),
        ("tclassify_a2t_heldout_phrasing", "held-out phrasing a2t"),
        ("tclassify_t2a_heldout_phrasing", "held-out phrasing t2a"),
        ("a2t_R1", "a2t R@1"),
        ("a2t_R10", "a2t R@10"),
        ("t2a_R1", "t2a R@1"),
        ("t2a_R10", "t2a R@10"),
        ("zeroshot_accuracy", "zero-shot"),
    ],
}
# cliptime from this checkout when run as `python benchmarks/<script>.py` (before an installed one); after the
# benchmarks' own folder, so that their modules (jobs.py) win over the checkout's folders of the same name (jobs/)
sys.path.insert(1, str(ROOT))


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


def run_script(script: str, flags: list[str], workdir: Path) -> tuple[float, dict]:
    """Run jobs/`script` with `flags` as a user would, MLflow and checkpoints in `workdir`; (seconds, the JSON
    object of its last stdout line)."""
    cmd = [sys.executable, str(ROOT / "jobs" / script), "--storage-path", str(workdir / "ray_results"), *flags]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    seconds = time.time() - started
    if proc.returncode != 0:
        sys.exit(f"{script} {' '.join(flags)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return seconds, json.loads(proc.stdout.strip().splitlines()[-1])


def run_job(script: str, flags: list[str], workdir: Path) -> tuple[float, dict]:
    """A training job's (seconds, metrics), run as `run_script` runs it."""
    seconds, result = run_script(script, flags, workdir)
    return seconds, result["metrics"]


def over_seeds(runs: list[dict[str, float]]) -> dict[str, dict]:
    """Each metric over runs that differ only in their training seed: mean, sample standard deviation (0 for one
    run), and the values in run order. A metric missing from a run is summarized over the runs that have it."""
    names = dict.fromkeys(name for run in runs for name in run)
    summary = {}
    for name in names:
        values = [float(run[name]) for run in runs if name in run]
        summary[name] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values,
        }
    return summary


def mean_std(stat: dict | None, digits: int = 3) -> str:
    """`0.981 ± 0.004` for a summary of `over_seeds` (the spread left out for one run), `-` for none."""
    if stat is None:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    return f"{text} ± {stat['std']:.{digits}f}" if len(stat["values"]) > 1 else text


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the header row, the rule under it, a line per row."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
