"""Predict with a registered model: `python jobs/predict.py models:/cliptime@champion photo.png`.

CLIPTime: an image (optionally `--caption`) -> stage, class probabilities, estimated hours; a folder of images ->
a Parquet or CSV table (`--out`), computed with Ray Data in batches. T-CLAP: a WAV file with `--captions ...` ->
captions ranked by score; `--order "A" "B"` -> which order the clip plays. The last stdout line is JSON.
"""

import sys
from pathlib import Path

# Prefer the checkout this script sits in (a `ray job submit --working-dir` copy) over an installed cliptime.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cliptime.cli import exit_process, predict_main  # noqa: E402

if __name__ == "__main__":
    exit_process(predict_main())
