"""End-to-end targets of the training jobs: run each job as a user would, time it, check its metrics.

    python benchmarks/jobs.py                    # both jobs with their defaults
    python benchmarks/jobs.py --task cliptime    # one job; extra job flags after `--`

Targets (issue #2 and #3), with no arguments on a 2-core CPU machine:
- CLIPTime: whole job <= 15 min; test accuracy >= 0.98; Spearman rho >= 0.9 for hyphae and mycelium.
- T-CLAP: whole job (with its lambda-0 baseline) <= 20 min; T-Classify >= 0.90 both ways while the baseline stays
  near chance; zero-shot accuracy no more than 2 points below the baseline's.
Results go to benchmarks/results/jobs-<date>.json and .md with the command, the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"cliptime": "train_cliptime.py", "tclap": "train_tclap.py"}


def targets(task: str, seconds: float, m: dict) -> dict[str, bool]:
    if task == "cliptime":
        return {
            "job <= 15 min": seconds <= 15 * 60,
            "test accuracy >= 0.98": m["test/accuracy"] >= 0.98,
            "spearman hyphae >= 0.9": m.get("test/spearman_hyphae", 0) >= 0.9,
            "spearman mycelium >= 0.9": m.get("test/spearman_mycelium", 0) >= 0.9,
        }
    return {
        "job <= 20 min": seconds <= 20 * 60,
        "T-Classify a2t >= 0.90": m["test/tclassify_a2t"] >= 0.90,
        "T-Classify t2a >= 0.90": m["test/tclassify_t2a"] >= 0.90,
        "baseline T-Classify near chance (<= 0.65 both ways)": max(
            m["baseline/test/tclassify_a2t"], m["baseline/test/tclassify_t2a"]
        )
        <= 0.65,
        "zero-shot within 2 points of baseline": m["test/zeroshot_accuracy"]
        >= m["baseline/test/zeroshot_accuracy"] - 0.02,
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU used"


def run(task: str, extra: list[str], workdir: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "jobs" / JOBS[task]), "--storage-path", str(workdir / "ray_results"), *extra]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    seconds = time.time() - started
    if proc.returncode != 0:
        sys.exit(f"{task} job failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    checks = targets(task, seconds, result["metrics"])
    return {
        "task": task,
        "command": " ".join(["python", f"jobs/{JOBS[task]}", *extra]),
        "seconds": round(seconds),
        "metrics": result["metrics"],
        "targets": checks,
    }


def markdown(rows: list[dict], when: str, where: str) -> str:
    out = [f"# Job benchmarks, {when}", "", f"Machine: {where}", ""]
    for r in rows:
        out += [
            f"## {r['task']}: `{r['command']}`",
            "",
            f"Wall time: {r['seconds']} s",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        out += [f"| {k} | {v:.3f} |" for k, v in sorted(r["metrics"].items()) if k.startswith(("test/", "baseline/"))]
        out += ["", "| target | met |", "|---|---|"]
        out += [f"| {k} | {'yes' if ok else 'NO'} |" for k, ok in r["targets"].items()]
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=[*JOBS, "all"], default="all")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("extra", nargs="*", help="flags passed to the job (after --)")
    args = parser.parse_args()
    tasks = list(JOBS) if args.task == "all" else [args.task]
    when = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"jobs-{'-'.join(tasks)}-{when}"
    payload = {"date": when, "machine": machine(), "results": []}
    rows = payload["results"]
    for task in tasks:  # results are written after each job, so a later failure loses none
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run(task, args.extra, Path(tmp)))
        (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
        (out / f"{stem}.md").write_text(markdown(rows, when, payload["machine"]))
    print(
        json.dumps({"written": str(out / f"{stem}.json"), "targets_met": all(all(r["targets"].values()) for r in rows)})
    )


if __name__ == "__main__":
    main()
