"""The quality table of both papers: each row one configuration, trained on the same data and budget.

    python benchmarks/quality.py                          # both tasks, the jobs' default data and budget
    python benchmarks/quality.py --task cliptime --budget --sequences 30 --epochs 8
    python benchmarks/quality.py --task cliptime --only "MLP head" --seeds 0   # one row again, one seed

- CLIPTime: Time-Transformer vs. MLP time head (the paper's first ablation), `generic` vs. `detailed` prompts;
  on the image alone (a stage-neutral caption): accuracy, on grayscale and hue-shifted images too, time MAE in
  hours overall and per stage, Spearman rho per stage; and the caption-conditioned accuracy.
- T-CLAP: lambda 0.5 (T-CLAP), lambda 0 with the same order pooling (the loss ablation), and plain CLAP (lambda 0,
  CLAP's own pooling: the job's baseline); T-Classify both ways, retrieval R@1/R@10, zero-shot accuracy.
Every row is trained once per seed (`--seed N`, default 0 1 2) and reports each metric's mean and standard
deviation over them. `--budget` flags (data size, epochs) apply to every row of the task. `--runs-from FILE` (a
`benchmarks/jobs.py` results JSON) gives a row the runs that file holds of the same command and seeds instead of
training them again (the default rows are the default jobs); the table names the file beside the row.
Results: benchmarks/results/quality-<tasks>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import COLUMNS, RESULTS, machine, markdown_table, mean_std, over_seeds, run_job, today, write_results

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


def row(task: str, config: str, command: str, runs: list[tuple[float, dict]], prefix: str) -> dict:
    """A table row: each column's mean and spread over the runs (one per seed), the job's wall time too."""
    metrics = over_seeds([{k: m[f"{prefix}{k}"] for k, _ in COLUMNS[task] if f"{prefix}{k}" in m} for _, m in runs])
    seconds = over_seeds([{"seconds": s} for s, _ in runs])["seconds"]
    return {"task": task, "config": config, "command": command, "seconds": seconds, "metrics": metrics}


def runs_in(files: list[str], seeds: list[int]) -> dict[str, tuple[str, list[tuple[float, dict]]]]:
    """command -> (file, its runs of `seeds` in that order) of every `benchmarks/jobs.py` result in `files` that
    ran all of those seeds."""
    found = {}
    for file in files:
        for result in json.loads(Path(file).read_text())["results"]:
            by_seed = {run["seed"]: (run["seconds"], run["metrics"]) for run in result["runs"]}
            if all(seed in by_seed for seed in seeds):
                found[result["command"]] = (Path(file).name, [by_seed[seed] for seed in seeds])
    return found


def rows_of(task: str, budget: list[str], only: list[str], seeds: list[int], done: dict) -> list[dict]:
    rows = []
    for label, (script, flags) in CONFIGS[task].items():
        if only and not any(text in label for text in only):
            continue
        command = " ".join(["python", f"jobs/{script}", *flags, *budget])
        source, runs = done.get(command, (None, []))
        print(f"{label}: {f'the runs in {source}' if source else f'training seeds {seeds}'}", file=sys.stderr)
        for seed in [] if source else seeds:
            with tempfile.TemporaryDirectory() as tmp:
                seconds, metrics = run_job(script, [*flags, *budget, "--seed", str(seed)], Path(tmp))
            runs.append((round(seconds), metrics))
        rows.append({**row(task, label, command, runs, "test/"), "runs_from": source})
        if any(k.startswith("baseline/test/") for k in runs[0][1]):
            rows.append({**row(task, BASELINE, command, runs, "baseline/test/"), "seconds": None, "runs_from": source})
    return rows


def table(rows: list[dict], task: str) -> str:
    """The Markdown table of one task's rows: each cell the mean ± standard deviation over the seeds."""
    cols = COLUMNS[task]
    lines = [
        [
            r["config"],
            *(mean_std(r["metrics"].get(k)) for k, _ in cols),
            mean_std(r["seconds"], 0),
            f"`{r['command']}`",
            r.get("runs_from") or "this run",
        ]
        for r in rows
        if r["task"] == task
    ]
    return markdown_table(["configuration", *(name for _, name in cols), "job (s)", "command", "runs"], lines)


def markdown(rows: list[dict], when: str, where: str, budget: list[str], seeds: list[int]) -> str:
    out = [f"# Quality table, {when}", "", f"Machine: {where}  "]
    out.append(f"Budget flags: `{' '.join(budget) or '(defaults)'}`  ")
    out.append(f"Training seeds: {' '.join(map(str, seeds))} (each cell: mean ± standard deviation over them)")
    for task in dict.fromkeys(r["task"] for r in rows):
        out += ["", f"## {task} (test split)", "", table(rows, task)]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--only", action="append", default=[], metavar="TEXT", help="only the rows whose label contains TEXT"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds, one run each")
    parser.add_argument(
        "--runs-from",
        action="append",
        default=[],
        metavar="FILE",
        help="a benchmarks/jobs.py results JSON whose runs of a row's command and seeds the row takes",
    )
    parser.add_argument("--budget", nargs=argparse.REMAINDER, default=[], help="job flags for every row (last)")
    args = parser.parse_args()
    tasks = list(CONFIGS) if args.task == "all" else [args.task]
    when = today()
    done = runs_in(args.runs_from, args.seeds)
    payload = {"date": when, "machine": machine(), "budget": args.budget, "seeds": args.seeds, "results": []}
    for task in tasks:  # written after each task, so a later failure loses none
        payload["results"] += rows_of(task, args.budget, args.only, args.seeds, done)
        report = markdown(payload["results"], when, payload["machine"], args.budget, args.seeds)
        partial = "-partial" if args.only else ""  # a rerun of some rows leaves the full table in place
        written = write_results(args.out, f"quality-{'-'.join(tasks)}-{when}{partial}", payload, report)
    print(json.dumps({"written": str(written)}))


if __name__ == "__main__":
    main()
