"""Write a generated data set as Parquet shards: `make_shards.py cliptime OUT_DIR` or `make_shards.py tclap OUT_DIR`.

Shards go to OUT_DIR/{train,val,test}/*.parquet with OUT_DIR/manifest.json, written to a temporary directory and
renamed into place when complete. Train on them with `train_cliptime.py --data OUT_DIR` or
`train_tclap.py --data OUT_DIR`. The last stdout line is one JSON object with the manifest.
"""

import sys
from pathlib import Path

# Prefer the checkout this script sits in (a `ray job submit --working-dir` copy) over an installed cliptime.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cliptime.cli import exit_process, make_shards_main  # noqa: E402

if __name__ == "__main__":
    exit_process(make_shards_main())
