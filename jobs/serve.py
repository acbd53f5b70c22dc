"""Serve a registered model on Ray Serve: `python jobs/serve.py models:/cliptime@champion` (127.0.0.1:8000).

POST /predict with the file as the body (CLIPTime: an image, `?caption=...`; T-CLAP: a WAV file,
`?captions=A&captions=B` or `?order=A&order=B`) or JSON {"data": <base64 file>, ...} -> the JSON answer of
jobs/predict.py; GET / is a page to drop a file on. Ctrl-C stops it; the last stdout line is JSON.
"""

import sys
from pathlib import Path

# Prefer the checkout this script sits in (a `ray job submit --working-dir` copy) over an installed cliptime.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cliptime.cli import exit_process, serve_main  # noqa: E402

if __name__ == "__main__":
    exit_process(serve_main())
