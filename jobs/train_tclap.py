"""Fine-tune a CLAP model with T-CLAP's temporal-focused loss on Ray, compare it with plain CLAP, register it.

With no arguments: generates mixed-up sound-event clips with order captions and reversed negatives, trains the
tiny CPU config (PANN Cnn6 + a small transformer text branch) with lambda 0.5 and, on the same data and budget,
a plain-CLAP baseline (lambda 0); evaluates both on held-out instances (T-Classify, retrieval, zero-shot), logs
to MLflow (`sqlite:///mlflow.db`) and registers `tclap`. The last stdout line is one JSON object.
"""

import sys
from pathlib import Path

# Prefer the checkout this script sits in (a `ray job submit --working-dir` copy) over an installed cliptime.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cliptime.cli import exit_process, train_main  # noqa: E402

if __name__ == "__main__":
    exit_process(train_main("tclap", __doc__))
