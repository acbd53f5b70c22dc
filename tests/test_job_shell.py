"""The one job shell, end to end in-process on a toy task whose answer is known: its data made once, trained,
tested, registered once, resumed, predicted; and the run records `--resume` reads."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from cliptime import job
from cliptime.cli import predict_main, run_job
from cliptime.errors import CliptimeError, Interrupted
from cliptime.predict import load
from cliptime.registry import load_files
from cliptime.runtime import TRAIN_POLL_ENV, TRAIN_POLL_SECONDS, Storage, handlers_kept, init_ray
from tests.conftest import registered_versions
from tests.toy_task import ToyConfig, ToyTask

SPLIT_COORDINATORS: dict[str, int] = {}  # Ray Data's coordinator actors in the Ray session, before and after toy_run


def split_coordinators() -> int:
    """Ray Data's streaming-split coordinator actors of the tests' Ray so far, alive or ended (asked of that Ray by
    its address: another Ray on the machine must not answer)."""
    import ray
    from ray.util.state import list_actors

    found = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "SplitCoordinator")],
        limit=10_000,
        raise_on_missing_output=False,
    )
    return len(found)


@pytest.fixture(scope="module")
def toy_run(ray_session, migrated_store_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    shutil.copy(migrated_store_file, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    task = ToyTask(ToyConfig(generate_log=str(root / "generated.log")))
    tc = ToyTask.train_config(storage_path=str(root / "ray_results"), experiment="test-toy")
    SPLIT_COORDINATORS["before"] = split_coordinators()
    result = job.run(task, tc)
    SPLIT_COORDINATORS["after"] = split_coordinators()
    yield result, task, tc, uri, root
    mp.undo()


def test_the_job_learns_what_the_data_say(toy_run):
    result, _, _, uri, _ = toy_run
    assert result.metrics["test/accuracy"] >= 0.85  # chance is 0.5
    assert result.headline == {"test/accuracy": result.metrics["test/accuracy"]}  # the toy task's monitor, tested
    assert result.model_name == "toy" and [str(v.version) for v in registered_versions(uri, "toy")] == ["1"]
    client = MlflowClient(uri)
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "val/accuracy")) == [0, 1, 2]
    assert client.get_run(result.run_id).data.params["train.lr"] == "0.01"  # the task's preset, not TrainConfig's


def test_one_worker_reads_the_train_split_without_a_coordinator(toy_run):
    """Several workers each read their part of the train split through Ray Data's coordinator actor; the toy
    job's one worker reads all of it itself, without that actor's process to start (on the old split the run
    made one). That the batches are the same: benchmarks/results/job-start-2026-12-07.md."""
    _, _, tc, _, _ = toy_run
    assert tc.num_workers == 1
    assert SPLIT_COORDINATORS["after"] == SPLIT_COORDINATORS["before"], SPLIT_COORDINATORS


def test_a_poll_interval_set_in_the_environment_is_kept(ray_session, monkeypatch):
    """Jobs poll their training runs every 0.5 s unless the person set Ray Train's variable themselves."""
    monkeypatch.setenv(TRAIN_POLL_ENV, "3")
    init_ray()
    assert os.environ[TRAIN_POLL_ENV] == "3"
    monkeypatch.delenv(TRAIN_POLL_ENV)
    init_ray()
    assert os.environ[TRAIN_POLL_ENV] == TRAIN_POLL_SECONDS


@pytest.mark.parametrize(
    "before", [signal.default_int_handler, signal.SIG_IGN, signal.SIG_DFL], ids=["python's", "ignored", "default"]
)
def test_sigint_is_handled_after_a_run_as_before_it(before):
    """Ray Train's and Tune's runs leave a SIGINT handler bound to the run, which swallows the next Ctrl-Cs;
    `handlers_kept`, around every run a job starts, puts back what was there, "ignored" too (a background job of
    a shell script)."""
    outer = signal.signal(signal.SIGINT, before)
    try:
        with handlers_kept(signal.SIGINT):
            signal.signal(signal.SIGINT, lambda signum, frame: None)  # as a run's handler
        assert signal.getsignal(signal.SIGINT) == before
    finally:
        signal.signal(signal.SIGINT, outer)


@pytest.mark.parametrize("sigint", ["python's", "a run's", "ignored", "blocked"])
def test_sigterm_stops_a_job_as_ctrl_c_does_whatever_sigint_is(sigint, capsys):
    """`run_job` turns SIGTERM into a stop (exit 130, one "stopped:" line) by running SIGINT's handler itself: a
    run's own (Ray Tune's and Ray Train's stop their run gracefully) is called, not bypassed, and the stop works
    where SIGINT is ignored (a script's background job) or blocked (Ray blocks it in the entrypoint of a job from
    `ray job submit`): sending SIGINT there would do nothing. SIGTERM's handler is put back after the job."""
    run_stops = []  # what the run's handler saw: as Ray Tune's, it flags the run to stop and returns

    def job():
        try:
            signal.raise_signal(signal.SIGTERM)
            deadline = time.time() + 3
            while not run_stops and time.time() < deadline:  # a stop interrupts this, or flags it
                time.sleep(0.05)
        except KeyboardInterrupt:
            raise Interrupted("toy: interrupted") from None
        if run_stops:
            raise Interrupted("toy: interrupted")
        return {"stopped": False}

    handler = {"a run's": lambda signum, frame: run_stops.append(signum), "ignored": signal.SIG_IGN}
    sigterm_before, sigint_before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    try:
        signal.signal(signal.SIGINT, handler.get(sigint, signal.default_int_handler))
        if sigint == "blocked":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        assert run_job(job) == 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a SIGINT left pending is dropped, not raised in pytest
        signal.pthread_sigmask(signal.SIG_SETMASK, mask_before)
        signal.signal(signal.SIGINT, sigint_before)
    assert capsys.readouterr().err.strip() == "stopped: toy: interrupted"
    assert run_stops == ([signal.SIGINT] if sigint == "a run's" else [])
    assert signal.getsignal(signal.SIGTERM) == sigterm_before


def test_the_data_are_made_once(toy_run):
    *_, root = toy_run
    lines = (root / "generated.log").read_text().splitlines()
    assert sorted(lines) == sorted(["train 0", "train 1", "train 2", "train 3", "val 0", "test 0"])


def test_a_finished_run_is_not_resumed_into_a_new_version(toy_run, monkeypatch):
    result, task, tc, uri, root = toy_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(CliptimeError, match="no unfinished toy run to resume"):
        job.run(task, ToyTask.train_config(resume="latest", storage_path=tc.storage_path))
    with pytest.raises(
        CliptimeError, match=f"--resume {result.run_name}: that run finished and registered toy version 1"
    ):
        job.run(task, ToyTask.train_config(resume=result.run_name, storage_path=tc.storage_path))
    assert [str(v.version) for v in registered_versions(uri, "toy")] == ["1"]


def test_registering_a_run_again_returns_its_version(toy_run, monkeypatch, capsys):
    """A job that dies between registering and recording that it finished registers nothing more on --resume."""
    import mlflow

    from cliptime.registry import log_and_register

    result, _, _, uri, _ = toy_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    task, model = load(f"models:/toy/{result.model_version}")
    with mlflow.start_run(run_id=result.run_id):
        assert log_and_register(task, model, True, {}) == result.model_version
    assert f"run {result.run_id} is already registered as toy version 1" in capsys.readouterr().out
    assert [str(v.version) for v in registered_versions(uri, "toy")] == ["1"]
    assert MlflowClient(uri).get_model_version("toy", "1").tags["run_id"] == result.run_id


def test_a_name_in_use_is_refused_with_the_command_to_continue(toy_run):
    result, task, tc, *_ = toy_run
    with pytest.raises(CliptimeError, match=f"--resume {result.run_name}"):
        job.run(task, ToyTask.train_config(name=result.run_name, storage_path=tc.storage_path))


def test_predict_loads_the_registered_model_and_answers(toy_run, monkeypatch, tmp_path, capsys):
    _, _, _, uri, _ = toy_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    np.save(tmp_path / "x.npy", np.array([3.0, -3.0, 0.0, 0.0]))
    assert predict_main(["models:/toy/1", str(tmp_path / "x.npy")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["label"] == "first"
    assert predict_main(["models:/toy/1", str(tmp_path / "x.npy"), "--order", "a", "b"]) == 2
    assert "is a Toy model: --order is for T-CLAP" in capsys.readouterr().err


# -- run records ----------------------------------------------------------------------------------------------
def test_records_are_replaced_whole_and_latest_skips_baselines(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write("tclap-1", "run.json", {"mlflow_run_id": "a"})
    storage.write("tclap-1-baseline", "run.json", {"mlflow_run_id": "b", "parent_run_id": "a"})
    storage.write("tclap-1", "run.json", {"mlflow_run_id": "a", "again": True})
    assert sorted(p.name for p in (tmp_path / "tclap-1").iterdir()) == ["run.json"]  # no temporary left
    assert storage.find("latest", "run.json", what="tclap run", prefix="tclap-") == (
        "tclap-1",
        {"mlflow_run_id": "a", "again": True},
    )
    (tmp_path / "tclap-1" / "run.json").write_text('{"mlflow_run_id": ')
    with pytest.raises(CliptimeError, match="run.json is not valid JSON"):
        storage.read("tclap-1", "run.json")
    with pytest.raises(CliptimeError, match="--resume nope: no such tclap run"):
        storage.find("nope", "run.json", what="tclap run", prefix="tclap-")


def test_a_run_held_by_a_live_process_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    import subprocess
    import sys

    storage = Storage(str(tmp_path))
    with storage.hold("toy-1"):
        with pytest.raises(CliptimeError, match=r"toy-1 is in use by process \d+ on .*remove .*cliptime.lock"):
            with storage.hold("toy-1"):
                pass
    assert not (tmp_path / "toy-1" / "cliptime.lock").exists()
    gone = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, socket, psutil, json; print(json.dumps({'host': "
            "socket.gethostname(), 'pid': os.getpid(), 'started': psutil.Process().create_time()}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    storage.write("toy-1", "cliptime.lock", json.loads(gone))
    with storage.hold("toy-1"):  # its process has exited
        assert json.loads((tmp_path / "toy-1" / "cliptime.lock").read_text())["pid"] != json.loads(gone)["pid"]


# -- the registered model: plain files, loaded without running code from the registry ---------------------------
def test_a_version_is_weights_and_a_config_with_no_pickle(toy_run):
    result, _, _, uri, _ = toy_run
    client = MlflowClient(uri)
    version = client.get_model_version("toy", result.model_version)
    files = {a.path for a in client.list_artifacts(version.run_id, "model/artifacts")}
    assert files == {"model/artifacts/cliptime.json", "model/artifacts/weights.safetensors"}
    everything = [a.path for a in client.list_artifacts(version.run_id, "model")]
    assert not [p for p in everything if p.endswith((".pkl", ".pickle"))], everything


def test_the_project_loader_unpickles_nothing(toy_run, monkeypatch):
    import pickle

    import cloudpickle

    _, _, _, uri, _ = toy_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for module in (pickle, cloudpickle):
        monkeypatch.setattr(module, "load", refuse)
        monkeypatch.setattr(module, "loads", refuse)
    task, model = load("models:/toy/1")
    out = task.predict(model, task.input_example())
    assert list(out.columns) == ["label"]


def test_mlflow_loads_the_pyfunc_with_pickle_refused(toy_run, monkeypatch):
    import mlflow

    _, _, _, uri, _ = toy_run
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/toy/1")
    x = np.array([3.0, -3.0, 0.0, 0.0], dtype=np.float32).tobytes()
    assert model.predict(pd.DataFrame({"x": [x]}))["label"].tolist() == ["first"]


def test_a_version_of_the_older_format_loads_from_its_tensors(tmp_path):
    """Versions registered before the safetensors format: `weights.pt` (a state dict) and `task_config.json`."""
    task = ToyTask(ToyConfig(hidden=4))
    model = task.build_model()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "task_config.json").write_text(
        json.dumps({"task": "tests.toy_task:ToyTask", "task_config": {"hidden": 4}})
    )
    loaded_task, loaded = load_files(tmp_path)
    assert loaded_task.cfg == task.cfg
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_init_from_a_checkpoint_of_another_shape_or_no_checkpoint_is_one_line(toy_run, tmp_path):
    from cliptime.train import check_initial_weights, initial_weights

    result, task, *_ = toy_run
    assert set(initial_weights(result.checkpoint)) == set(task.build_model().state_dict())
    check_initial_weights(task, result.checkpoint)
    with pytest.raises(CliptimeError, match=r"^--init-from .*: its weights do not fit this toy model \(Error"):
        check_initial_weights(ToyTask(ToyConfig(hidden=32)), result.checkpoint)
    with pytest.raises(CliptimeError, match=rf"^--init-from {tmp_path}: not a readable checkpoint folder"):
        check_initial_weights(task, str(tmp_path))


@pytest.mark.parametrize("damage", ["empty", "cut in half"])
def test_a_checkpoint_cut_short_is_passed_over_for_the_one_before(damage, tmp_path):
    """A crash while state.pt was written out leaves it empty or cut short: a resume takes the checkpoint before
    and says so, and --init-from names the folder in one line."""
    from cliptime import train

    for epoch in (0, 1):
        folder = tmp_path / f"checkpoint_2026-12-06_00-00-0{epoch}"
        folder.mkdir()
        train.save_checkpoint(folder, {"model": {"w": torch.full((64,), float(epoch))}, "epoch": epoch}, [{}])
    state = folder / train.STATE_FILE
    state.write_bytes(b"" if damage == "empty" else state.read_bytes()[: state.stat().st_size // 2])
    said = []
    loaded, _ = train.load_newest_intact(str(tmp_path), "cpu", say=said.append)
    assert loaded["epoch"] == 0 and said[0].startswith(f"warning: checkpoint {folder} is damaged")
    with pytest.raises(CliptimeError, match=rf"^--init-from {folder}: not a readable checkpoint folder"):
        train.initial_weights(str(folder))


@pytest.mark.slow
def test_a_run_started_from_a_checkpoint_starts_from_its_weights(toy_run, tmp_path):
    """With a learning rate too small to learn anything in an epoch, the first epoch scores what the checkpoint
    had learnt (the toy's chance is 0.5), and the run's params name where it started."""
    result, task, tc, uri, _ = toy_run
    tuned = job.run(
        task, dataclasses.replace(tc, init_from=result.checkpoint, lr=1e-7, epochs=1, name="tuned", register=False)
    )
    assert tuned.metrics["test/accuracy"] >= 0.85
    assert MlflowClient(uri).get_run(tuned.run_id).data.params["train.init_from"] == result.checkpoint
