"""What a job shows the person who started it.

On a terminal each epoch is a progress bar (steps, loss, samples/s, ETA) that gives way to the epoch's line of
validation metrics; elsewhere (a pipe, a log, CI) only the epoch lines are printed. The logs of Ray, Ray Data,
MLflow and the other libraries go to the run's log file, named once, unless `--verbose`. At the end the job prints
a short summary (test metrics, where the model went) and then its JSON line, the last line on stdout.

Training workers and Ray Train's controller are other processes, whose prints would reach the driver only through
Ray's log forwarding, with everything else they print. What they have to say to the person goes through a
`Messages` channel instead: a Ray queue that `follow` drains on a driver thread while the run trains.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from queue import Empty

STEP_SECONDS = 0.5  # how often rank 0 sends its progress within an epoch
MLFLOW_BARS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # MLflow's artifact download bars, read at each download


class Messages:
    """The way from training workers and the controller to the person at the driver. It travels in the training
    loop's config (picklable: a Ray queue's handle). Without a queue, as in a sweep's trials or a bare `train.fit`,
    lines are printed where they are said, and step progress is dropped."""

    def __init__(self, queue=None):
        self.queue = queue
        self._last_step = 0.0

    def say(self, line: str) -> None:
        """A line for the person: a warning, a resume notice."""
        self._send("say", line)

    def epoch(self, line: str) -> None:
        """The line that closes an epoch (its validation metrics)."""
        self._send("epoch", line)

    def step(self, epoch: int, step: int, loss, samples_per_second: float) -> None:
        """Where the epoch stands, sent at most every STEP_SECONDS: `loss` (a tensor on the device) is read only
        then, so the other steps wait for no device-to-host copy."""
        now = time.monotonic()
        if self.queue is not None and now - self._last_step >= STEP_SECONDS:
            self._last_step = now
            self.queue.put(("step", epoch, step, float(loss), samples_per_second))

    def _send(self, kind: str, line: str) -> None:
        if self.queue is None:
            print(line, flush=True)
        else:
            self.queue.put((kind, line))


def new_messages() -> Messages:
    """A channel whose queue lives in a small actor that reserves no CPU (training and Ray Data have them all)."""
    from ray.util.queue import Queue

    return Messages(Queue(actor_options={"num_cpus": 0}))


@contextmanager
def follow(messages: Messages, epochs: int, steps_per_epoch: int):
    """Show what arrives on `messages` while the block runs: on a terminal (stderr) a progress bar per epoch,
    and each epoch's line and said line on stdout."""
    from tqdm import tqdm

    stop = threading.Event()
    bars: dict[int, tqdm] = {}
    terminal = sys.stderr.isatty()

    def close_bars() -> None:
        for bar in bars.values():
            bar.close()
        bars.clear()

    def show(kind: str, *payload) -> None:
        if kind == "step":
            epoch, step, loss, samples_per_second = payload
            if not terminal:
                return
            if epoch not in bars:
                close_bars()
                bars[epoch] = tqdm(
                    total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, file=sys.stderr
                )
            bars[epoch].set_postfix_str(f"loss {loss:.4g}, {samples_per_second:.0f} samples/s", refresh=False)
            bars[epoch].update(step - bars[epoch].n)
            return
        if kind == "epoch":
            close_bars()
        tqdm.write(payload[0], file=sys.stdout)
        sys.stdout.flush()

    def drain() -> None:
        while True:
            try:
                show(*messages.queue.get(timeout=0.2))
            except Empty:
                if stop.is_set():
                    return

    thread = threading.Thread(target=drain, name="cliptime-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        close_bars()


# -- where the libraries' logs go -----------------------------------------------------------------------------
_CAPTURE: list[tuple[logging.Handler, dict]] = []  # the file handler of the `logs_to` block in force, and what it saved


@contextmanager
def logs_to(path: Path | None):
    """Send Python logging (Ray's, Ray Data's, MLflow's, every library's) and warnings to the file `path` while the
    block runs, and turn Ray Data's progress bars off; `path` None (--verbose) leaves all of it on the terminal.

    Loggers that print to the terminal lose those handlers for the block and write to the file instead. Ray sets
    its terminal handler again when it starts: `quiet_again` after `ray.init` takes it off once more."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)  # Ray Data's executor reports its state at DEBUG every few seconds
    saved: dict[logging.Logger, list[logging.Handler]] = {}
    _CAPTURE.append((handler, saved))
    quiet_again()
    logging.captureWarnings(True)
    bars = _ray_data_progress_bars(False)
    mlflow_bars = os.environ.get(MLFLOW_BARS)
    os.environ[MLFLOW_BARS] = "false"
    try:
        yield
    finally:
        _CAPTURE.pop()
        logging.captureWarnings(False)
        _ray_data_progress_bars(bars)
        if mlflow_bars is None:
            os.environ.pop(MLFLOW_BARS)
        else:
            os.environ[MLFLOW_BARS] = mlflow_bars
        for logger, handlers in saved.items():
            logger.handlers = handlers
        handler.close()


def quiet_again() -> None:
    """Inside a `logs_to` block: every logger that writes to the terminal writes to the block's file instead (the
    root logger too, which takes what the others pass on)."""
    if not _CAPTURE:
        return
    handler, saved = _CAPTURE[-1]
    root = logging.getLogger()
    loggers = [root, *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    for logger in loggers:
        terminal = [h for h in logger.handlers if _to_terminal(h)]
        if terminal or logger is root:
            saved.setdefault(logger, list(logger.handlers))
            logger.handlers = [h for h in logger.handlers if h not in terminal and h is not handler] + [handler]


def _to_terminal(handler: logging.Handler) -> bool:
    """Whether a handler prints (to the terminal, or to a stream that forwards to it, as MLflow's does)."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def _ray_data_progress_bars(on: bool) -> bool:
    """Turn Ray Data's progress bars on or off for the datasets this driver builds; returns the old setting."""
    import ray.data

    context = ray.data.DataContext.get_current()
    before, context.enable_progress_bars = context.enable_progress_bars, on
    return before


# -- the end of a job -----------------------------------------------------------------------------------------
def table(rows: list[list[str]], rule: bool = True) -> list[str]:
    """Rows of cells as text lines whose columns line up, the first row a header (underlined with dashes when
    `rule`)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return [lines[0], *(["  ".join("-" * w for w in widths)] if rule else []), *lines[1:]]
