"""The quality table of both papers: each row one configuration, trained on the same data and budget.

    python benchmarks/quality.py                          # both tasks, the jobs' default data and budget
    python benchmarks/quality.py --task cliptime --budget --sequences 30 --epochs 8
    python benchmarks/quality.py --task cliptime --only "MLP head"     # one row again

- CLIPTime: Time-Transformer vs. MLP time head (the paper's first ablation), `generic` vs. `detailed` prompts;
  accuracy, macro-F1, time MAE in hours overall and per stage, Spearman rho per stage.
- T-CLAP: lambda 0.5 (T-CLAP), lambda 0 with the same order pooling (the loss ablation), and plain CLAP (lambda 0,
  CLAP's own pooling: the job's baseline); T-Classify both ways, retrieval R@1/R@10, zero-shot accuracy.
`--budget` flags (data size, epochs) apply to every row of the task. Results: benchmarks/results/quality-<date>.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import RESULTS, machine, run_job, today, write_results

# row label -> (job script, flags); the T-CLAP job also trains and reports its plain-CLAP baseline.
CONFIGS = {
    "cliptime": {
        "Time-Transformer head, generic prompts": ("train_cliptime.py", []),
        "MLP head, generic prompts": ("train_cliptime.py", ["--head", "mlp"]),
        "Time-Transformer head, detailed prompts": ("train_cliptime.py", ["--templates", "detailed"]),
    },
    "tclap": {
        "T-CLAP (lambda 0.5)": ("train_tclap.py", []),
        "lambda 0, order pooling (loss ablation)": ("train_tclap.py", ["--lambda", "0", "--no-baseline"]),
    },
}
BASELINE = "plain CLAP (lambda 0, CLAP pooling; the job's baseline)"
COLUMNS = {
    "cliptime": [
        ("accuracy", "accuracy"),
        ("macro_f1", "macro-F1"),
        ("time_mae_hours", "MAE h"),
        ("time_mae_hours_spore", "MAE spore"),
        ("time_mae_hours_hyphae", "MAE hyphae"),
        ("time_mae_hours_mycelium", "MAE mycelium"),
        ("spearman_spore", "rho spore"),
        ("spearman_hyphae", "rho hyphae"),
        ("spearman_mycelium", "rho mycelium"),
    ],
    "tclap": [
        ("tclassify_a2t", "T-Classify a2t"),
        ("tclassify_t2a", "T-Classify t2a"),
        ("a2t_R1", "a2t R@1"),
        ("a2t_R10", "a2t R@10"),
        ("t2a_R1", "t2a R@1"),
        ("t2a_R10", "t2a R@10"),
        ("zeroshot_accuracy", "zero-shot"),
    ],
}


def row(task: str, config: str, command: str, seconds: float | None, metrics: dict, prefix: str) -> dict:
    values = {k: metrics[f"{prefix}{k}"] for k, _ in COLUMNS[task] if f"{prefix}{k}" in metrics}
    return {"task": task, "config": config, "command": command, "seconds": seconds, "metrics": values}


def rows_of(task: str, budget: list[str], only: list[str]) -> list[dict]:
    rows = []
    for label, (script, flags) in CONFIGS[task].items():
        if only and not any(text in label for text in only):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            seconds, metrics = run_job(script, [*flags, *budget], Path(tmp))
        command = " ".join(["python", f"jobs/{script}", *flags, *budget])
        rows.append(row(task, label, command, round(seconds), metrics, "test/"))
        if any(k.startswith("baseline/test/") for k in metrics):
            rows.append(row(task, BASELINE, command, None, metrics, "baseline/test/"))
    return rows


def markdown(rows: list[dict], when: str, where: str, budget: list[str]) -> str:
    out = [f"# Quality table, {when}", "", f"Machine: {where}  ", f"Budget flags: `{' '.join(budget) or '(defaults)'}`"]
    for task in dict.fromkeys(r["task"] for r in rows):
        cols = COLUMNS[task]
        out += ["", f"## {task} (test split)", ""]
        out.append("| configuration | " + " | ".join(name for _, name in cols) + " | command |")
        out.append("|---" * (len(cols) + 2) + "|")
        for r in (r for r in rows if r["task"] == task):
            values = " | ".join(f"{r['metrics'][k]:.3f}" if k in r["metrics"] else "-" for k, _ in cols)
            out.append(f"| {r['config']} | {values} | `{r['command']}` |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--only", action="append", default=[], metavar="TEXT", help="only the rows whose label contains TEXT"
    )
    parser.add_argument("--budget", nargs=argparse.REMAINDER, default=[], help="job flags for every row (last)")
    args = parser.parse_args()
    tasks = list(CONFIGS) if args.task == "all" else [args.task]
    when = today()
    payload = {"date": when, "machine": machine(), "budget": args.budget, "results": []}
    for task in tasks:  # written after each task, so a later failure loses none
        payload["results"] += rows_of(task, args.budget, args.only)
        report = markdown(payload["results"], when, payload["machine"], args.budget)
        partial = "-partial" if args.only else ""  # a rerun of some rows leaves the full table in place
        written = write_results(args.out, f"quality-{'-'.join(tasks)}-{when}{partial}", payload, report)
    print(json.dumps({"written": str(written)}))


if __name__ == "__main__":
    main()
