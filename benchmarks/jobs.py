"""End-to-end targets of the training jobs: run each job as a user would, time it, check its metrics.

    python benchmarks/jobs.py                    # both jobs with their defaults
    python benchmarks/jobs.py --task cliptime    # one job; extra job flags after `--`
    python benchmarks/jobs.py --task tclap --seeds 0 1    # the job once per training seed (--seed N)

Targets (issue #2 and #3), with no arguments on a 2-core CPU machine:
- CLIPTime: whole job <= 15 min; test accuracy >= 0.98; Spearman rho >= 0.9 for hyphae and mycelium.
- T-CLAP: whole job (with its lambda-0 baseline) <= 20 min; T-Classify >= 0.90 both ways while the baseline stays
  near chance; zero-shot accuracy no more than 2 points below the baseline's.
Results go to benchmarks/results/jobs-<date>.json and .md with the command, the machine and the date.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

from common import RESULTS, machine, run_job, today, write_results

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


def run(task: str, extra: list[str], workdir: Path) -> dict:
    seconds, metrics = run_job(JOBS[task], extra, workdir)
    checks = targets(task, seconds, metrics)
    return {
        "task": task,
        "command": " ".join(["python", f"jobs/{JOBS[task]}", *extra]),
        "seconds": round(seconds),
        "metrics": metrics,
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
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="run each job once per training seed: is a target met run after run?"
    )
    parser.add_argument("extra", nargs="*", help="flags passed to the job (after --)")
    args = parser.parse_args()
    tasks = list(JOBS) if args.task == "all" else [args.task]
    when = today()
    stem = f"jobs-{'-'.join(tasks)}-{when}"
    payload = {"date": when, "machine": machine(), "results": []}
    rows = payload["results"]
    runs = [[*args.extra, "--seed", str(seed)] for seed in args.seeds] if args.seeds else [args.extra]
    for task, extra in itertools.product(tasks, runs):  # written after each job: a later failure loses none
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run(task, extra, Path(tmp)))
        written = write_results(args.out, stem, payload, markdown(rows, when, payload["machine"]))
    print(json.dumps({"written": str(written), "targets_met": all(all(r["targets"].values()) for r in rows)}))


if __name__ == "__main__":
    main()
