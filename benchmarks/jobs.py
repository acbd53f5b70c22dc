"""End-to-end targets of the training jobs: run each job as a user would, once per training seed, time it, and
check its targets on the mean over the seeds.

    python benchmarks/jobs.py                          # both jobs with their defaults, seeds 0 1 2
    python benchmarks/jobs.py --task cliptime          # one job; extra job flags after `--`
    python benchmarks/jobs.py --task tclap --seeds 0   # one run (an anecdote: quality figures are over seeds)

Targets, with no arguments on a 2-core CPU machine (issues #16, #17 and #19):
- CLIPTime, judged on the image alone (a stage-neutral caption): whole job <= 15 min; image-only accuracy >= 0.98
  and >= 0.95 on grayscale test images; image-only time MAE <= 2% of the time range; Spearman rho of predicted
  and true time >= 0.8 within the spore stage and >= 0.9 within hyphae and mycelium.
- T-CLAP: whole job (with its lambda-0 baseline) <= 20 min; T-Classify >= 0.95 both ways while the baseline stays
  near chance; >= 0.90 on held-out phrasings; zero-shot accuracy at least the baseline's.
- Both: at most 10% of the job outside training steps (the job's JSON `seconds`: Ray start, data, per-epoch
  validation, test, registration).
Results go to benchmarks/results/jobs-<tasks>-<date>.json and .md with the command, the machine and the date:
each metric's mean and standard deviation over the seeds, and every run's own figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import COLUMNS, RESULTS, machine, markdown_table, mean_std, over_seeds, run_script, today, write_results

from cliptime.tasks.cliptime import CLIPTimeConfig

JOBS = {"cliptime": "train_cliptime.py", "tclap": "train_tclap.py"}
HOURS = CLIPTimeConfig.hours[1] - CLIPTimeConfig.hours[0]  # the default job's time range
# The models a job reports (README rows): the T-CLAP job also trains and tests its plain-CLAP baseline.
MODELS = {
    "cliptime": {"CLIPTime": "test/"},
    "tclap": {"T-CLAP (lambda 0.5)": "test/", "plain CLAP (lambda 0, the job's baseline)": "baseline/test/"},
}


def targets(task: str, seconds: float, m: dict) -> dict[str, bool]:
    overhead = {"overhead <= 10% of the job": m["overhead"] <= 0.10}
    if task == "cliptime":
        return {
            "job <= 15 min": seconds <= 15 * 60,
            **overhead,
            "image-only accuracy >= 0.98": m["test/accuracy_image_only"] >= 0.98,
            "grayscale accuracy >= 0.95": m["test/accuracy_grayscale"] >= 0.95,
            f"image-only time MAE <= 2% of the range ({0.02 * HOURS:.2f} h)": m["test/time_mae_hours_image_only"]
            <= 0.02 * HOURS,
            "image-only spearman spore >= 0.8": m.get("test/spearman_spore_image_only", 0) >= 0.8,
            "image-only spearman hyphae >= 0.9": m.get("test/spearman_hyphae_image_only", 0) >= 0.9,
            "image-only spearman mycelium >= 0.9": m.get("test/spearman_mycelium_image_only", 0) >= 0.9,
        }
    return {
        "job <= 20 min": seconds <= 20 * 60,
        **overhead,
        "T-Classify a2t >= 0.95": m["test/tclassify_a2t"] >= 0.95,
        "T-Classify t2a >= 0.95": m["test/tclassify_t2a"] >= 0.95,
        "held-out phrasing a2t >= 0.90": m.get("test/tclassify_a2t_heldout_phrasing", 0) >= 0.90,
        "held-out phrasing t2a >= 0.90": m.get("test/tclassify_t2a_heldout_phrasing", 0) >= 0.90,
        "baseline T-Classify near chance (<= 0.65 both ways)": max(
            m["baseline/test/tclassify_a2t"], m["baseline/test/tclassify_t2a"]
        )
        <= 0.65,
        "zero-shot at least the baseline's": m["test/zeroshot_accuracy"] >= m["baseline/test/zeroshot_accuracy"],
    }


def add_run(result: dict, seed: int) -> None:
    """Run the job of `result` once more, with `--seed seed`, and update its summary over seeds and its targets."""
    task, extra = result["task"], result["flags"]
    with tempfile.TemporaryDirectory() as tmp:
        seconds, job = run_script(JOBS[task], [*extra, "--seed", str(seed)], Path(tmp))
    # the share of the job's own time (its JSON line) outside training steps, and the part of it in validation
    spent = job["seconds"]
    metrics = {**job["metrics"], "overhead": 1 - spent["training"] / spent["total"]}
    if "validation" in spent:
        metrics["validation_share"] = spent["validation"] / spent["total"]
    result["seeds"].append(seed)
    result["runs"].append({"seed": seed, "seconds": round(seconds), "job_seconds": job["seconds"], "metrics": metrics})
    result["summary"] = over_seeds([{"seconds": r["seconds"], **r["metrics"]} for r in result["runs"]])
    means = {name: stat["mean"] for name, stat in result["summary"].items()}
    result["targets"] = {  # judged on the means; how many runs met each on their own beside it
        name: {"mean": met, "runs": sum(targets(task, r["seconds"], r["metrics"])[name] for r in result["runs"])}
        for name, met in targets(task, means["seconds"], means).items()
    }


def markdown(rows: list[dict], when: str, where: str) -> str:
    out = [f"# Job benchmarks, {when}", "", f"Machine: {where}", ""]
    for r in rows:
        n = len(r["runs"])
        out += [f"## {r['task']}: `{r['command']}`, seeds {' '.join(map(str, r['seeds']))}", ""]
        lines = []
        for name, stat in r["summary"].items():
            if name in ("seconds", "overhead", "validation_share") or name.startswith(("test/", "baseline/")):
                digits = 0 if name == "seconds" else 3
                lines.append([name, mean_std(stat, digits), *(f"{v:.{digits}f}" for v in stat["values"])])
        out += [markdown_table(["metric", "mean ± std", *(f"seed {s}" for s in r["seeds"])], lines), ""]
        checks = [[k, "yes" if t["mean"] else "NO", f"{t['runs']}/{n}"] for k, t in r["targets"].items()]
        out += [markdown_table(["target (on the mean)", "met", "runs that met it"], checks), ""]
    return "\n".join(out)


def readme_table(results: list[dict]) -> str:
    """The README's table of job results of one task: a row per model and command, mean ± std over the seeds."""
    task = results[0]["task"]
    cols = COLUMNS[task]
    lines = []
    for r in results:
        for i, (model, prefix) in enumerate(MODELS[task].items()):
            seconds = mean_std(r["summary"]["seconds"], 0) if i == 0 else "(with the row above)"
            overhead = mean_std(r["summary"].get("overhead"), 2) if i == 0 else ""
            values = [mean_std(r["summary"].get(prefix + k)) for k, _ in cols]
            lines.append([model, *values, seconds, overhead, str(len(r["seeds"])), f"`{r['command']}`"])
    header = ["model", *(name for _, name in cols), "job (s)", "overhead", "seeds", "command"]
    return markdown_table(header, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=[*JOBS, "all"], default="all")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds, one run each")
    parser.add_argument("extra", nargs="*", help="flags passed to the job (after --)")
    args = parser.parse_args()
    tasks = list(JOBS) if args.task == "all" else [args.task]
    when = today()
    stem = f"jobs-{'-'.join(tasks)}-{when}"
    payload = {"date": when, "machine": machine(), "results": []}
    for task in tasks:
        result = {"task": task, "command": " ".join(["python", f"jobs/{JOBS[task]}", *args.extra])}
        payload["results"].append({**result, "flags": args.extra, "seeds": [], "runs": []})
        for seed in args.seeds:  # written after each run: a later failure loses none
            add_run(payload["results"][-1], seed)
            written = write_results(args.out, stem, payload, markdown(payload["results"], when, payload["machine"]))
    met = all(t["mean"] for r in payload["results"] for t in r["targets"].values())
    print(json.dumps({"written": str(written), "targets_met": met}))


if __name__ == "__main__":
    main()
