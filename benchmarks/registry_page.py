"""A registered model's cards as a person sees them: `mlflow server` on 127.0.0.1 over a tracking store, the
version's page (`#/models/NAME/versions/N`) and the registered model's (`#/models/NAME`) in headless Chromium, a
PNG screenshot of each taken once its description is drawn.

    python benchmarks/registry_page.py                          # a fresh store: a tiny CLIPTime job, 1 epoch
    python benchmarks/registry_page.py --task tclap             # ... a tiny T-CLAP job
    python benchmarks/registry_page.py --store ~/work --model cliptime --version 3

A store is a folder holding `mlflow.db` (its artifacts in `mlartifacts/` beside it), as the jobs leave one in
their working directory. The browser is `chromium-headless-shell` (`apt-get install chromium-headless-shell`),
driven as tests/test_serve.py drives it (tests/chromium.py). The PNGs go to --out as
registry-page-MODEL-{version,model}-DATE.png; the last stdout line is JSON naming them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from common import RESULTS, run_job, today
from mlflow.tracking import MlflowClient

from cliptime.runtime import free_port
from cliptime.tasks import TASKS
from tests.chromium import Page


@contextmanager
def mlflow_server(store: Path) -> Iterator[str]:
    """An `mlflow server` on 127.0.0.1 over the store's `mlflow.db`, until the block ends; its URL."""
    port = free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server"),
            *("--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while not _healthy(url):
            if server.poll() is not None or time.time() > deadline:
                sys.exit(f"mlflow server over {store / 'mlflow.db'} did not come up")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).ok
    except requests.RequestException:
        return False


def tiny_job(task_name: str, store: Path) -> None:
    """One epoch of the task's tiny preset in small batches, registered in `store` by its job script, as a user
    runs it."""
    cls = TASKS[task_name]
    tiny = {**cls.data_sizes, **cls.tiny_model}
    flags = [arg for k, v in tiny.items() for arg in (f"--{k.replace('_', '-')}", str(v))]
    run_job(f"train_{task_name}.py", [*flags, "--epochs", "1", "--batch-size", "8", "--cpus-per-worker", "1"], store)


def first_words(markdown: str) -> str:
    """Text the rendered description shows: its first heading, or the start of its first line, without markup."""
    heading = re.search(r"^#+\s+(.+)$", markdown, re.MULTILINE)
    line = heading.group(1) if heading else markdown.strip().splitlines()[0]
    return re.sub(r"[*`_\[\]#]", "", line).strip()[:40]


def screenshot(url: str, description: str, width: int, height: int, source_run: bool) -> bytes:
    """The page at `url` once `description` is drawn on it (and, with `source_run`, the link to the version's
    run), as a PNG of width x height; MLflow's assistant panel, if the page opens one, is closed first."""
    page = Page(width, height)
    try:
        page.open(url)
        page.wait_for(f"document.body.innerText.includes({json.dumps(first_words(description))})", timeout=120)
        if source_run:
            page.wait_for("document.querySelector('a[href*=\"/runs/\"]') !== null", timeout=120)
        page.evaluate("document.querySelector('button[aria-label=Close]')?.click()")
        time.sleep(1)  # the page settles into the width the panel leaves
        return page.screenshot()
    finally:
        page.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="a folder with mlflow.db (default: a fresh one with one tiny --task job)")
    parser.add_argument("--task", choices=list(TASKS), default="cliptime", help="the fresh store's job")
    parser.add_argument("--model", help="registered model (default: --task)")
    parser.add_argument("--version", help="its version (default: the newest)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1800)
    parser.add_argument("--out", default=str(RESULTS), help="folder of the PNGs")
    args = parser.parse_args()
    model = args.model or args.task
    written = {}
    with tempfile.TemporaryDirectory(prefix="registry-page-") as scratch:
        store = Path(args.store).expanduser().resolve() if args.store else Path(scratch)
        if not args.store:
            tiny_job(args.task, store)
        if not (store / "mlflow.db").is_file():
            sys.exit(f"--store {store}: no mlflow.db there")
        client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
        version = args.version or str(max(int(v.version) for v in client.search_model_versions(f"name = '{model}'")))
        pages = {
            "version": (f"versions/{version}", client.get_model_version(model, version).description),
            "model": ("", client.get_registered_model(model).description),
        }
        with mlflow_server(store) as url:
            for page, (path, description) in pages.items():
                if not description:
                    sys.exit(f"{model} version {version}: its {page} page has no description to look at")
                page_url = f"{url}/#/models/{model}/{path}".rstrip("/")
                png = screenshot(page_url, description, args.width, args.height, source_run=page == "version")
                written[page] = Path(args.out) / f"registry-page-{model}-{page}-{today()}.png"
                written[page].parent.mkdir(parents=True, exist_ok=True)
                written[page].write_bytes(png)
    print(json.dumps({"written": {page: str(path) for page, path in written.items()}, "version": version}))


if __name__ == "__main__":
    main()
