"""A headless Chromium driven over the DevTools protocol: load a page, hand a file to a file input as a user's pick
would, wait for the page's answer, take a screenshot. `.ci/run` installs `chromium-headless-shell`."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import requests
from websockets.sync.client import connect

from cliptime.runtime import free_port

BROWSER = "chromium-headless-shell"


class Page:
    """One tab of a headless Chromium of its own (killed by `close`, with every process it started)."""

    def __init__(self, width: int = 900, height: int = 900):
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        port = free_port()
        self.proc = subprocess.Popen(
            [
                shutil.which(BROWSER) or BROWSER,
                *("--no-sandbox", "--disable-gpu", f"--user-data-dir={self.profile}"),
                *(f"--remote-debugging-port={port}", f"--window-size={width},{height}", "about:blank"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # its own process group, all of which `close` ends: Debian's chromium-headless-shell is a shell script
            # that starts the browser as its child, which killing the script alone would leave running
            start_new_session=True,
        )
        deadline = time.time() + 60
        while True:
            try:
                targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
                break
            except (requests.RequestException, StopIteration):
                assert self.proc.poll() is None and time.time() < deadline, f"{BROWSER} did not start"
                time.sleep(0.3)
        self.ws = connect(url, max_size=None)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        """One DevTools command; its result (events that arrive meanwhile are skipped)."""
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == call_id:
                assert "error" not in message, message["error"]
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str, timeout: float = 60) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", timeout)

    def wait_for(self, expression: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not self.evaluate(expression):
            assert time.time() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.2)

    def pick_file(self, selector: str, path: Path) -> None:
        """Give the file input `selector` the file `path`, as a user's pick in the file dialog (a change event)."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", files=[str(path)], nodeId=node)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        self.ws.close()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)
