"""Does a sweep beat the defaults? Each quick sweep, run as a user would, against the default training job of its
task on the same data and budget, both judged on the test split.

    python benchmarks/sweeps.py                                              # both quick sweeps, seeds 0 1 2
    python benchmarks/sweeps.py --spaces tune_spaces/tclap-quick.yaml --seeds 0

The default job gets the space's `fixed` settings (data size, epochs, CPUs), spelled as the job's own parser reads
them, and nothing that the space searches, so every searched setting stays at its default; T-CLAP's also without
its plain-CLAP baseline, so that it trains one model, as a trial does. The sweep (seeded) gives one figure, its best
trial's model on the test split; the default job runs once per training seed. The sweep beats the defaults when
its figure on the metric it ranks on (its `val/` metric, on the test split) is better than the defaults' mean.
Target: the T-CLAP quick sweep's best model reaches T-Classify a2t >= 0.85 within 25 minutes (the whole sweep:
data, trials, test, registration).
Results go to benchmarks/results/sweeps-<tasks>-<date>.json and .md with the commands, the machine and the date:
both models' test metrics, the wall times of the sweep and of each default job, and the verdicts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import (
    COLUMNS,
    RESULTS,
    machine,
    markdown_table,
    mean_std,
    over_seeds,
    run_job,
    run_script,
    today,
    write_results,
)

from cliptime.cli import train_parser
from cliptime.tune import SweepSpec, load_spec

SPACES = ["tune_spaces/cliptime-quick.yaml", "tune_spaces/tclap-quick.yaml"]
ONE_MODEL = {"tclap": {"baseline": False}}  # default-job settings that train one model, as a sweep trial does


def job_flags(task: str, settings: dict) -> list[str]:
    """`settings` ({setting: value}) as flags of the task's training job, each spelled as its parser reads it."""
    actions = {action.dest: action for action in train_parser(task)._actions}
    flags = []
    for name, value in settings.items():
        action = actions[name]
        if isinstance(action, argparse.BooleanOptionalAction):  # option_strings: --name, --no-name
            flags.append(action.option_strings[0 if value else 1])
        else:
            flags += [action.option_strings[0], *map(str, value if isinstance(value, (list, tuple)) else [value])]
    return flags


def default_flags(spec: SweepSpec) -> list[str]:
    """The default job's flags on the sweep's data and budget: the space's `fixed` settings (nothing it searches),
    one model. After a warm start, a trial's model has trained the warm start's epochs and then its own: the
    default job trains as many, from scratch."""
    settings = {**spec.fixed, **ONE_MODEL.get(spec.task_cls.name, {})}
    if spec.warm_start:
        settings["epochs"] = spec.warm_start["epochs"] + spec.settings({}, "", "")[1].epochs
    return job_flags(spec.task, settings)


def sweep_result(space: str, spec: SweepSpec, seconds: float, out: dict) -> dict:
    """The result of `space` from its sweep's wall time and last JSON line `out`; its default job's runs to come."""
    task = spec.task_cls.name
    flags = default_flags(spec)
    return {
        "space": space,
        "task": task,
        "metric": spec.metric.replace("val/", "test/", 1),
        "mode": spec.mode,
        "sweep_command": f"python jobs/tune.py {space}",
        "default_command": " ".join(["python", f"jobs/train_{task}.py", *flags]),
        "default_flags": flags,
        "sweep": {
            "seconds": round(seconds),
            "trials": out["trials"],
            "best_config": out["best_config"],
            spec.metric: out["best_value"],
            "model_version": out["model_version"],
            "metrics": {f"test/{k}": v for k, v in out["test_metrics"].items()},
        },
        "default": {"runs": [], "summary": {}},
        "verdicts": {},
    }


def verdicts(r: dict) -> dict[str, bool]:
    """Whether the sweep's best model beats the defaults' mean on the ranked test metric, and the target."""
    ranked, best = r["metric"], r["sweep"]["metrics"][r["metric"]]
    mean = r["default"]["summary"][ranked]["mean"]
    out = {f"sweep beats defaults on {ranked}": best > mean if r["mode"] == "max" else best < mean}
    if Path(r["space"]).name == "tclap-quick.yaml":
        out["best T-Classify a2t >= 0.85 within 25 min"] = (
            r["sweep"]["metrics"]["test/tclassify_a2t"] >= 0.85 and r["sweep"]["seconds"] <= 25 * 60
        )
    return out


def add_run(r: dict, seed: int, seconds: float, metrics: dict) -> None:
    """One more run of the default job in `r`: its summary over the seeds and the verdicts updated."""
    runs = r["default"]["runs"]
    runs.append({"seed": seed, "seconds": round(seconds), "metrics": metrics})
    r["default"]["summary"] = over_seeds([{"seconds": run["seconds"], **run["metrics"]} for run in runs])
    r["verdicts"] = verdicts(r)


def comparison_table(r: dict) -> str:
    """The best model of the sweep against the default job's mean +- std over seeds, on the test split: the ranked
    metric first, then the task's other columns, wall time, runs and command."""
    sweep, default, names = r["sweep"], r["default"], dict(COLUMNS[r["task"]])
    keys = [r["metric"], *(f"test/{k}" for k in names if f"test/{k}" != r["metric"])]
    lines = [
        ["best of the sweep", *(f"{sweep['metrics'][k]:.3f}" if k in sweep["metrics"] else "-" for k in keys)]
        + [str(sweep["seconds"]), "1", f"`{r['sweep_command']}`"],
        ["defaults", *(mean_std(default["summary"].get(k)) for k in keys)]
        + [mean_std(default["summary"].get("seconds"), 0), str(len(default["runs"])), f"`{r['default_command']}`"],
    ]
    header = ["model", *(names.get(k.removeprefix("test/"), k) for k in keys), "wall (s)", "runs", "command"]
    return markdown_table(header, lines)


def markdown(results: list[dict], when: str, where: str, command: str) -> str:
    out = [f"# Quick sweeps vs. default jobs, {when}", "", f"Machine: {where}  ", f"Command: `{command}`", ""]
    for r in results:
        sweep, default = r["sweep"], r["default"]
        walls = ", ".join(f"{run['seconds']} s (seed {run['seed']})" for run in default["runs"]) or "-"
        out += [f"## {r['task']}: `{r['space']}`, ranked on {r['metric']} ({r['mode']})", ""]
        out += [f"Best of {sweep['trials']} trials: `{json.dumps(sweep['best_config'], sort_keys=True)}`  "]
        out += [f"Sweep: {sweep['seconds']} s; default jobs: {walls}", ""]
        out += [comparison_table(r), ""]
        out += [markdown_table(["verdict", "met"], [[k, "yes" if v else "NO"] for k, v in r["verdicts"].items()]), ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spaces", nargs="+", default=SPACES, help="search-space files: each swept, then compared")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the default job's seeds, a run each")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    specs = {space: load_spec(space) for space in args.spaces}  # a bad file stops here, before any sweep
    when, where = today(), machine()
    command = " ".join(["python", "benchmarks/sweeps.py", *sys.argv[1:]])
    stem = f"sweeps-{'-'.join(spec.task_cls.name for spec in specs.values())}-{when}"
    payload = {"date": when, "machine": where, "command": command, "results": []}

    def save() -> Path:  # after the sweep and after each default run: a later failure loses none
        return write_results(args.out, stem, payload, markdown(payload["results"], when, where, command))

    for space, spec in specs.items():
        with tempfile.TemporaryDirectory() as tmp:
            name = f"bench-{spec.task_cls.name}"
            seconds, out = run_script("tune.py", [str(Path(space).resolve()), "--name", name], Path(tmp))
        r = sweep_result(space, spec, seconds, out)
        payload["results"].append(r)
        written = save()
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                seconds, metrics = run_job(
                    f"train_{r['task']}.py", [*r["default_flags"], "--seed", str(seed)], Path(tmp)
                )
            add_run(r, seed, seconds, metrics)
            written = save()
    print(json.dumps({"written": str(written), "verdicts": {r["space"]: r["verdicts"] for r in payload["results"]}}))


if __name__ == "__main__":
    main()
