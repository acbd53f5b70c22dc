"""Hyperparameter sweep: `python jobs/tune.py tune_spaces/cliptime-quick.yaml` (or tclap-quick.yaml, ...).

Ray Tune with a seeded OptunaSearch and ASHA early stopping drives the task's TorchTrainer, one trial at a time or
several; MLflow gets a parent run for the sweep (with Optuna's optimization-history and parameter-importance plots)
and a child run per trial. The best trial is tested and registered; the alias `champion` moves to it only if it
beats the current champion on the sweep's metric. `--resume` finishes an interrupted sweep.
The last stdout line is one JSON object: best trial, its metric, the champion's version.
"""

import sys
from pathlib import Path

# Prefer the checkout this script sits in (a `ray job submit --working-dir` copy) over an installed cliptime.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cliptime.cli import exit_process, tune_main  # noqa: E402

if __name__ == "__main__":
    exit_process(tune_main())
