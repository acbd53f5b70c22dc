"""What a job shows a person: worker lines and progress at the driver, the libraries' logs in a file, and each
command's own flags."""

from __future__ import annotations

import io
import logging
import sys
import time
import warnings

import pytest

from cliptime import console
from cliptime.cli import make_shards_main, train_parser


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def send_two_epochs(messages: console.Messages) -> None:
    """What rank 0 says over a run of two epochs of three steps (a step every 0.6 s, so each one is sent)."""
    for epoch in range(2):
        for step in range(1, 4):
            messages.step(epoch, step, 0.25 * (epoch + 1), 40.0)
            time.sleep(console.STEP_SECONDS + 0.1)
        messages.epoch(f"epoch {epoch + 1}/2: val/accuracy 0.9")
    messages.say("warning: something to know")


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_workers_lines_reach_the_driver_with_a_progress_bar_on_a_terminal(ray_session, terminal, capsys, monkeypatch):
    stderr = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    messages = console.new_messages()
    with console.follow(messages, epochs=2, steps_per_epoch=3):
        ray_session.get(ray_session.remote(send_two_epochs).options(num_cpus=0).remote(messages))
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["epoch 1/2: val/accuracy 0.9", "epoch 2/2: val/accuracy 0.9", "warning: something to know"]
    bars = stderr.getvalue()
    if terminal:
        assert "epoch 1/2" in bars and "epoch 2/2" in bars and "3/3" in bars
        assert "loss 0.25, 40 samples/s" in bars and "loss 0.5, 40 samples/s" in bars
    else:
        assert bars == ""  # a pipe gets the epoch lines alone


def test_without_a_queue_lines_are_printed_where_they_are_said(capsys):
    messages = console.Messages()
    messages.step(0, 1, 0.5, 10.0)
    messages.epoch("epoch 1/1: val/accuracy 1")
    messages.say("resuming from somewhere")
    assert capsys.readouterr().out.splitlines() == ["epoch 1/1: val/accuracy 1", "resuming from somewhere"]


def test_the_libraries_logs_and_warnings_go_to_the_file_and_come_back_after(tmp_path, capsys):
    library = logging.getLogger("some.library")
    library.addHandler(logging.StreamHandler(sys.stderr))
    library.propagate, library.level = False, logging.INFO
    log = tmp_path / "run" / "cliptime.log"
    try:
        with console.logs_to(log):
            library.info("connecting to the cluster")
            warnings.warn("this API is deprecated", DeprecationWarning, stacklevel=1)
            print("the job's own line")
        library.info("after the job")
    finally:
        library.handlers.clear()
    out, err = capsys.readouterr()
    assert out == "the job's own line\n"
    assert "connecting to the cluster" not in err and "after the job" in err
    written = log.read_text()
    assert "some.library: connecting to the cluster" in written and "this API is deprecated" in written
    assert "after the job" not in written


def test_verbose_leaves_the_logs_on_the_terminal(capsys):
    library = logging.getLogger("some.other.library")
    library.addHandler(logging.StreamHandler(sys.stderr))
    library.propagate, library.level = False, logging.INFO
    try:
        with console.logs_to(None):
            library.info("shown")
    finally:
        library.handlers.clear()
    assert "shown" in capsys.readouterr().err


def flags_of(help_text: str) -> set[str]:
    return {word.strip("[],") for word in help_text.split() if word.startswith(("--", "[--"))}


@pytest.mark.parametrize(
    ("task", "generator_flags", "not_data_flags"),
    [
        (
            "cliptime",
            {"--sequences", "--frames", "--image-size", "--hours", "--templates", "--data-seed"},
            {"--model", "--fusion", "--head", "--cls-weight", "--epochs", "--lr", "--caption-dropout"},
        ),
        (
            "tclap",
            {"--train-pairs", "--train-singles", "--gap", "--templates", "--data-seed"},
            {"--audio-model", "--text-model", "--lambda", "--temporal-weight", "--epochs", "--baseline"},
        ),
    ],
)
def test_make_shards_offers_the_generators_flags_and_train_offers_all(task, generator_flags, not_data_flags, capsys):
    with pytest.raises(SystemExit):
        make_shards_main([task, "--help"])
    shown = flags_of(capsys.readouterr().out)
    assert generator_flags <= shown
    assert not shown & not_data_flags
    train_flags = flags_of(train_parser(task).format_help())
    assert generator_flags | not_data_flags | {"--verbose", "--data"} <= train_flags
