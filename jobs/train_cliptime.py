"""Train CLIPTime (stage + timestamp from an image and its caption) on Ray, log to MLflow, register the model.

With no arguments: generates the fungal-growth data set, trains the tiny CPU config on a local Ray instance,
evaluates on the held-out sequences and registers `cliptime` in `sqlite:///mlflow.db`.
The last stdout line is one JSON object: metrics, MLflow run id, registered model name and version.
"""

import sys
from pathlib import Path

# Prefer the checkout this script sits in (a `ray job submit --working-dir` copy) over an installed cliptime.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cliptime.cli import exit_process, train_main  # noqa: E402

if __name__ == "__main__":
    exit_process(train_main("cliptime", __doc__))
