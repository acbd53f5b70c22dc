"""T-Classify per order pattern: which ways of saying "A, then B" a trained T-CLAP model understands (issue #17).

    python benchmarks/phrasings.py RUN=CHECKPOINT [RUN=CHECKPOINT ...] [--command RUN="python jobs/..."]

A job's `tclassify_a2t_heldout_phrasing` scores each test pair in one held-out phrasing (by its pair id), so a
pattern's weight follows how many phrasings compose from it, and the patterns the model trains on are not scored at
all unless they are its own template set. Here every mixed clip of the default generated test split (100 pairs,
both orders) is scored against every phrasing of every pattern, trained (`TRAIN_PATTERNS`, the `grammar` set) and
held out (`HELDOUT_PATTERNS`): the share of (clip, phrasing) pairs in which the clip's own order scores above the
same phrasing reversed (audio to text; chance 0.5), per pattern, over all its composed variants (leads, capitals,
full stops) and for its bare form. CHECKPOINT is a Ray Train checkpoint folder of a T-CLAP run on the default
model (the job prints it in its JSON line). Results: benchmarks/results/phrasings-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import ray.train
import torch
from common import RESULTS, machine, markdown_table, today, write_results

from cliptime.data.order_phrases import HELDOUT_PATTERNS, TRAIN_PATTERNS, compose, reversal
from cliptime.pipeline import prepare
from cliptime.runtime import start_local_ray
from cliptime.tasks.tclap import TCLAPTask
from cliptime.train import load_checkpoint_model


def pattern_scores(audio: torch.Tensor, events: list[tuple[str, str]], embed) -> dict[str, dict]:
    """pattern -> its kind ("train" or "heldout"), the share of clips whose own order scores above the reversed one
    in its bare form ("bare") and over all its composed phrasings ("variants"), and how many phrasings it has.
    `audio`: the clips' embeddings; `events`: each clip's (first, second) labels; `embed(texts)`: text embeddings."""
    scores = {}
    for kind, patterns in (("train", TRAIN_PATTERNS), ("heldout", HELDOUT_PATTERNS)):
        for pattern in patterns:
            shares = []
            for phrasing in compose((pattern,)):  # the bare pattern first
                said, swapped = zip(*(reversal(phrasing, a, b) for a, b in events))
                right = (audio * embed(list(said))).sum(-1) > (audio * embed(list(swapped))).sum(-1)
                shares.append(float(right.float().mean()))
            scores[pattern] = {
                "kind": kind,
                "bare": shares[0],
                "variants": float(np.mean(shares)),
                "phrasings": len(shares),
            }
    return scores


@torch.no_grad()
def checkpoint_scores(task: TCLAPTask, test, checkpoint: str) -> dict[str, dict]:
    """`pattern_scores` of the model in `checkpoint` on the mixed clips of the prepared split `test`."""
    model = load_checkpoint_model(task, ray.train.Checkpoint(checkpoint))
    audio, events, labels = [], [], list(task.event_classes.values())
    for batch in test.iter_torch_batches(batch_size=128):
        mixed = batch["pair"] >= 0
        audio.append(model(batch["audio"][mixed], batch["tokens"][mixed])[0])
        events += [
            (labels[a], labels[b]) for a, b in zip(batch["first"][mixed].tolist(), batch["second"][mixed].tolist())
        ]
    return pattern_scores(torch.cat(audio), events, lambda texts: model(None, model.tokenize(texts))[1])


def markdown(payload: dict) -> str:
    runs = payload["runs"]
    out = [f"# T-Classify per order pattern, {payload['date']}", "", f"Machine: {payload['machine']}", ""]
    out += ["Command: `" + payload["command"] + "`", ""]
    out += [f"- {name}: `{run['command']}`, checkpoint {run['checkpoint']}" for name, run in runs.items()]
    header = ["pattern", "kind", *(f"{name} (bare / all variants)" for name in runs)]
    rows = []
    for pattern, first in next(iter(runs.values()))["patterns"].items():
        cells = [
            f"{run['patterns'][pattern]['bare']:.3f} / {run['patterns'][pattern]['variants']:.3f}"
            for run in runs.values()
        ]
        rows.append([f"`{pattern}`", f"{first['kind']} ({first['phrasings']})", *cells])
    for kind in ("train", "heldout"):
        means = [
            np.mean([p["variants"] for p in run["patterns"].values() if p["kind"] == kind]) for run in runs.values()
        ]
        rows.append([f"**mean over the {kind} patterns**", "", *(f"{m:.3f}" for m in means)])
    return "\n".join([*out, "", markdown_table(header, rows), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN=CHECKPOINT")
    parser.add_argument("--command", action="append", default=[], metavar='RUN="python jobs/..."')
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    commands = dict(c.split("=", 1) for c in args.command)
    start_local_ray(num_cpus=2, log_to_driver=False)
    task = TCLAPTask(TCLAPTask.Config())
    test = prepare(task).splits["test"]
    payload = {
        "date": today(),
        "machine": machine(),
        "command": "python benchmarks/phrasings.py " + " ".join(args.runs),
    }
    payload["runs"] = {}
    for run in args.runs:
        name, checkpoint = run.split("=", 1)
        payload["runs"][name] = {
            "checkpoint": checkpoint,
            "command": commands.get(name, ""),
            "patterns": checkpoint_scores(task, test, checkpoint),
        }
    written = write_results(args.out, f"phrasings-{payload['date']}", payload, markdown(payload))
    print(json.dumps({"written": str(written)}))


if __name__ == "__main__":
    main()
