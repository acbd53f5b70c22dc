"""Recovery, tested by faults (issue #15): a job stopped by SIGTERM and a sweep stopped by Ctrl-C, each resumed;
a damaged newest checkpoint; the MLflow server restarted mid-run; a full disk under make_shards. Every test prints
what it recovered (lines starting "RECOVERY:", shown with `pytest -s`)."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cliptime.data.shards import check_shard
from cliptime.runtime import LOCK, Storage
from cliptime.tasks.cliptime import CLIPTimeTask
from tests.conftest import ROOT, MlflowServer, last_json_line, registered_versions

pytestmark = pytest.mark.slow

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal escape sequences (colours, cursor moves)
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+) \(")  # what a training worker prints per epoch (train.epoch_line)
TRAIN_DRIVER = """
import json, sys
from cliptime import job
from cliptime.cli import run_job
from tests.toy_task import ToyConfig, ToyTask
tc = ToyTask.train_config(**json.loads(sys.argv[1]))
toy = ToyConfig(rows=int(sys.argv[2]), hold_file=sys.argv[3])
sys.exit(run_job(lambda: job.run(ToyTask(toy), tc)))
"""


# -- helpers --------------------------------------------------------------------------------------------------
class Driver:
    """A job driver in its own process (its own local Ray), output to files: a pipe nobody reads would fill."""

    def __init__(self, cmd: list[str], env: dict, logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logs / "stdout", logs / "stderr"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True)

    def wait_for(self, condition, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the driver exited ({self.proc.returncode}):\n{self.tail()}"
            assert time.time() < deadline, f"timed out:\n{self.tail()}"
            time.sleep(0.2)

    def finish(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def tail(self) -> str:
        return (self.stdout()[-2000:] + "\n--- stderr ---\n" + self.stderr()[-4000:]).strip()


@pytest.fixture
def spawn():
    """Starts Drivers; one still running when its test ends (the test failed) is killed, with its Ray."""
    started: list[Driver] = []

    def start(cmd: list[str], env: dict, logs: Path) -> Driver:
        started.append(Driver(cmd, env, logs))
        return started[-1]

    yield start
    for driver in started:
        if driver.proc.poll() is None:
            os.killpg(driver.proc.pid, signal.SIGKILL)
            driver.proc.wait()


def env_with(uri: str, **extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri, **extra}


def train_driver(spawn, settings: dict, rows: int, env: dict, logs: Path, hold: Path | None = None) -> Driver:
    """A toy job's driver; `hold`: the toy task's hold_file."""
    return spawn([sys.executable, "-c", TRAIN_DRIVER, json.dumps(settings), str(rows), str(hold or "")], env, logs)


def epochs_trained(output: str) -> list[int]:
    """The epochs (0-based) a driver's workers trained, from their epoch lines."""
    return [int(m.group(1)) - 1 for m in EPOCH_LINE.finditer(output)]


def retrained(before: list[dict], after: list[dict]) -> list[int]:
    """The epochs of history `after` that a resumed run trained: those not carried over from `before`, the
    history of the checkpoint it could have resumed from (the metrics of an epoch trained again differ, its
    throughput at least)."""
    return [h["epoch"] for h in after if h["epoch"] >= len(before) or h != before[h["epoch"]]]


def checkpoints(run_folder: Path) -> list[Path]:
    """The checkpoint folders of a Ray Train run, oldest first (they are named by time)."""
    return sorted(p for p in run_folder.glob("checkpoint_*") if p.is_dir())


def newest_history(run_folder: Path) -> list[dict]:
    """The history of the newest checkpoint of a Ray Train run."""
    return json.loads((checkpoints(run_folder)[-1] / "history.json").read_text())


def stopped_line(err: str) -> str:
    """The one line `stopped: ...`, as a terminal shows it: Ray Data's progress bars on stderr end theirs with a
    carriage return and cursor moves, not a newline."""
    lines = [line for line in ANSI.sub("", err).splitlines() if line.startswith("stopped:")]
    assert len(lines) == 1, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    return lines[0]


def steps(client: MlflowClient, run_id: str, metric: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


# -- 1. SIGTERM of a training job -----------------------------------------------------------------------------
def test_sigterm_stops_a_job_killed_and_resume_finishes_it_in_the_same_run(
    ray_session, empty_store, monkeypatch, tmp_path, spawn, capsys
):
    """The job as its own process, SIGTERM to it; resumed in-process (on the tests' Ray)."""
    from cliptime import job
    from cliptime.cli import run_job
    from tests.toy_task import ToyConfig, ToyTask

    storage, epochs = tmp_path / "storage", 6  # more than train while the job stops
    settings = {"epochs": epochs, "storage_path": str(storage), "name": "sigterm", "experiment": "rec"}
    first = train_driver(spawn, settings, 4096, env_with(empty_store), tmp_path / "first")
    first.wait_for(lambda: any((c / "history.json").exists() for c in checkpoints(storage / "sigterm")))
    first.proc.send_signal(signal.SIGTERM)
    signalled = time.time()
    assert first.finish() == 130, first.tail()
    stop_seconds = time.time() - signalled
    assert "--resume sigterm" in stopped_line(first.stderr())
    record = Storage(str(storage)).read("sigterm", "cliptime_run.json")
    client = MlflowClient(empty_store)
    run_id = record["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    assert registered_versions(empty_store, "toy") == [] and not record.get("finished")
    assert not (storage / "sigterm" / LOCK).exists()
    kept = newest_history(storage / "sigterm")  # the epochs the resumed run must not train again
    assert 1 <= len(kept) < epochs, "SIGTERM should have hit the run after its first checkpoint, before its end"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store)
    capsys.readouterr()
    started = time.time()
    tc = ToyTask.train_config(resume="sigterm", storage_path=str(storage))
    assert run_job(lambda: job.run(ToyTask(ToyConfig(rows=4096)), tc)) == 0
    resume_seconds = time.time() - started
    result = last_json_line(capsys.readouterr().out)
    assert result["run_id"] == run_id
    assert steps(client, run_id) == list(range(epochs))  # every epoch once
    assert result["metrics"]["test/accuracy"] >= 0.8  # chance is 0.5
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [str(v.version) for v in registered_versions(empty_store, "toy")] == [result["model_version"]] == ["1"]
    again = retrained(kept, json.loads((Path(result["checkpoint"]) / "history.json").read_text()))
    assert again == list(range(len(kept), epochs))  # from the newest checkpoint, not from scratch
    before = epochs_trained(first.stdout())
    print(
        f"\nRECOVERY: SIGTERM -> exit 130 in {stop_seconds:.1f} s, {len(kept)} of {epochs} epochs checkpointed "
        f"(epochs trained before the stop, by the workers' lines: {before}); --resume trained epochs {again} and "
        f"finished in {resume_seconds:.1f} s; epochs trained twice: {sorted(set(before) & set(again))}"
    )


# -- 2. Ctrl-C of a sweep -------------------------------------------------------------------------------------
def test_ctrl_c_stops_a_sweep_unregistered_and_resume_finishes_it(
    ray_session, empty_store, monkeypatch, tmp_path, spawn, capsys
):
    """Ctrl-C while the last of two trials trains: Ray Tune then reports the interrupted trial TERMINATED, as
    if it had finished; the sweep must still see that it stopped, register nothing, and finish on --resume (run
    in-process, on the tests' Ray)."""
    import yaml

    from cliptime.cli import tune_main

    spec, storage, epochs = tmp_path / "toy.yaml", tmp_path / "storage", 8  # the last trial outlasts the stop
    spec.write_text(
        yaml.safe_dump(
            {
                "task": "tests.toy_task:ToyTask",
                "metric": "val/accuracy",
                "num_samples": 2,
                "max_concurrent": 1,
                "scheduler": {"type": "fifo"},
                "fixed": {"epochs": epochs, "rows": 2048},
                "space": {"lr": {"loguniform": [0.005, 0.02]}},
            }
        )
    )
    flags = [str(spec), "--storage-path", str(storage), "--experiment", "rec-sweep"]

    def trials_checkpointed() -> list[Path]:
        return [p for p in storage.glob("s1-*") if checkpoints(p)]

    first = spawn(
        [sys.executable, str(ROOT / "jobs" / "tune.py"), *flags, "--name", "s1"],
        env_with(empty_store),
        tmp_path / "first",
    )
    first.wait_for(lambda: len(trials_checkpointed()) == 2)  # one trial done, the last one past its first epoch
    first.proc.send_signal(signal.SIGINT)
    signalled = time.time()
    assert first.finish() == 130, first.tail()
    stop_seconds = time.time() - signalled
    assert "--resume s1" in stopped_line(first.stderr())
    assert registered_versions(empty_store, "toy") == []
    client = MlflowClient(empty_store)
    parent = Storage(str(storage)).read("s1", "cliptime_sweep.json")["mlflow_run_id"]
    assert client.get_run(parent).info.status == "KILLED"
    *done, last_trial = sorted(trials_checkpointed(), key=lambda p: checkpoints(p)[0].name)
    kept = newest_history(last_trial)
    assert len(kept) < epochs, "the last trial should have been stopped before its end"
    done_checkpoints = [checkpoints(p) for p in done]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store)
    capsys.readouterr()
    started = time.time()
    assert tune_main([*flags, "--resume", "s1"]) == 0
    resume_seconds = time.time() - started
    result = last_json_line(capsys.readouterr().out)
    assert result["run_id"] == parent and result["trials"] == 2
    versions = registered_versions(empty_store, "toy")
    assert [str(v.version) for v in versions] == [result["model_version"]] == [result["champion_version"]] == ["1"]
    assert client.get_run(parent).info.status == "FINISHED"
    assert [checkpoints(p) for p in done] == done_checkpoints  # the finished trials were not trained again
    again = retrained(kept, newest_history(last_trial))
    assert again == list(range(len(kept), epochs))  # the stopped trial went on from its checkpoint
    print(
        f"\nRECOVERY: Ctrl-C of a sweep -> exit 130 in {stop_seconds:.1f} s, 1 of 2 trials done, the last stopped "
        f"after {len(kept)} of {epochs} epochs; --resume trained epochs {again} of that trial only and registered "
        f"version {result['model_version']} (champion) in {resume_seconds:.1f} s"
    )


# -- 3. the newest checkpoint damaged -------------------------------------------------------------------------
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(ray_session, tmp_path):
    """A run whose newest checkpoint was cut short (a crash while it was written out) resumes from the one
    before, says so, and ends with one history of every epoch."""
    from cliptime import train
    from cliptime.pipeline import prepare, steps_per_epoch, training_datasets
    from tests.toy_task import ToyConfig, ToyTask

    data = prepare(ToyTask(ToyConfig(rows=1024)))

    def fit(epochs: int):
        tc = ToyTask.train_config(epochs=epochs, storage_path=str(tmp_path), name="damaged")
        datasets = training_datasets(data, tc.seed)
        return train.fit(data.task, tc, datasets, steps_per_epoch(data, tc.batch_size), "damaged", str(tmp_path), [])

    before = train.read_history(fit(2).checkpoint)
    newest = checkpoints(tmp_path / "damaged")[-1]
    state = newest / train.STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    started = time.time()
    history = train.read_history(fit(3).checkpoint)
    seconds = time.time() - started

    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert retrained(before, history) == [1, 2]  # from the intact checkpoint of epoch 0
    replayed = [e for e in retrained(before, history) if e < len(before)]  # trained in both runs
    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path())
    warned = [f for f in logs.glob("worker-*.out") if f"warning: checkpoint {newest} is damaged" in f.read_text()]
    assert warned, f"no worker warned about {newest}"
    print(
        f"\nRECOVERY: newest checkpoint ({newest.name}, epoch {before[-1]['epoch']}) truncated -> resumed from "
        f"the one before (epoch {history[0]['epoch']}), epochs trained again: {replayed}; 3-epoch run done in "
        f"{seconds:.1f} s"
    )


# -- 4. the MLflow server restarted mid-run -------------------------------------------------------------------
def hold_at(hold: Path, epoch: int) -> None:
    """Hold a toy run (its `hold_file`) at the start of `epoch`: the file replaced whole, never read half-written."""
    hold.with_suffix(".new").write_text(str(epoch))
    os.replace(hold.with_suffix(".new"), hold)


def test_a_job_outlives_an_mlflow_server_restart_and_logs_every_epoch(migrated_store_file, tmp_path, spawn):
    """The server goes away between two epochs and comes back some seconds later: the job trains on, warns about
    the epoch it could not log, logs it from its checkpoint at the end, and finishes its run. The run is held
    (the toy task's `hold_file`) so that exactly one epoch, the third, ends while the server is down, and the next
    waits until it is back: on a fast machine the run would otherwise end, and fail to log, while the server
    starts; on a slow one it could end an epoch before the server went down.

    The epoch logger runs in Ray Train's controller, a Ray worker: it has the environment of the process that
    started Ray, and of the driver's only the variables Ray Train passes on (its own). The tests' Ray started
    before this test set anything, so the job runs as a process of its own, with MLflow's retries cut to
    seconds."""
    shutil.copy(migrated_store_file, tmp_path / "mlflow.db")
    server, storage, epochs, hold = MlflowServer(tmp_path), tmp_path / "storage", 5, tmp_path / "hold"
    hold_at(hold, 2)
    server.start()
    retries = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # gives up in 1 s
    env = env_with(server.uri, **retries, MLFLOW_HTTP_REQUEST_BACKOFF_JITTER="0")
    settings = {"epochs": epochs, "storage_path": str(storage), "name": "outage", "experiment": "rec"}
    job = train_driver(spawn, {**settings, "register": False}, 2048, env, tmp_path / "job", hold)
    try:
        job.wait_for(lambda: Storage(str(storage)).read("outage", "cliptime_run.json") is not None)
        run_id = Storage(str(storage)).read("outage", "cliptime_run.json")["mlflow_run_id"]
        client = MlflowClient(server.uri)
        job.wait_for(lambda: steps(client, run_id) == [0, 1])  # logged, and the run waits at epoch 2
        server.kill()
        down = time.time()
        hold_at(hold, 3)  # epoch 2 trains and ends while the server is down
        job.wait_for(lambda: "warning: epoch 2 not logged to MLflow" in job.stdout())
        server.start()
        outage = time.time() - down
        hold.unlink()
        assert job.finish() == 0, job.tail()
        missed = sorted({int(e) for e in re.findall(r"warning: epoch (\d+) not logged to MLflow", job.stdout())})
        assert missed == [2]
        assert steps(client, run_id) == list(range(epochs))  # every epoch once, the missed one too
        assert "ended_at" not in client.get_run(run_id).data.metrics  # history bookkeeping, not a metric
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        if server.proc.poll() is None:
            server.kill()
    print(
        f"\nRECOVERY: MLflow server down {outage:.1f} s (killed after epoch 1, up again after a restart); the job "
        f"trained on, exit 0; epochs {missed} missed by the epoch logger were logged from the checkpoint at the "
        f"end: {epochs} epochs in the history, each once"
    )


# -- 5. a full disk under make_shards -------------------------------------------------------------------------
FULL_DISK_BYTES = 50_000  # more than a Ray worker's log files take, less than the generated train shard


def full_disk_runtime_env(runtime_env: dict | None) -> dict:
    """A RAY_RUNTIME_ENV_HOOK: every Ray worker of the job starts with `limit_file_size` (Ray's own processes,
    started before, and so the object store, stay unlimited)."""
    return {**(runtime_env or {}), "worker_process_setup_hook": f"{__name__}.limit_file_size"}


def limit_file_size() -> None:
    """A full disk without root: this process's writes past FULL_DISK_BYTES of a file fail with EFBIG (SIGXFSZ
    ignored, so the write raises instead of killing the process)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FULL_DISK_BYTES, FULL_DISK_BYTES))


def test_a_full_disk_fails_make_shards_in_one_line_and_keeps_the_old_shards(ray_session, tmp_path, capsys):
    from cliptime.cli import make_shards_main

    tiny = ["--sequences", "7", "--frames", "10", "--image-size", "32"]
    disk, old = tmp_path / "disk", tmp_path / "disk" / "old"
    assert make_shards_main(["cliptime", str(old), *tiny]) == 0, capsys.readouterr().err
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    assert max(len(b) for b in before.values()) > FULL_DISK_BYTES  # the limit stops the writing of such a shard

    def make_shards_on_full_disk(out: Path, *flags: str) -> tuple[subprocess.CompletedProcess, float]:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_RUNTIME_ENV_HOOK": f"{__name__}.full_disk_runtime_env"}
        command = [sys.executable, str(ROOT / "jobs" / "make_shards.py"), "cliptime", str(out), *tiny, *flags]
        started = time.time()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        return done, time.time() - started

    def error_line(done: subprocess.CompletedProcess, out: Path) -> str:
        """The job's one line. Ray Data logs the failed write task with its traceback above it (an I/O error in
        its own write operator counts to it as its own failure); an error the job did not handle exits 1."""
        assert done.returncode == 2, done.stderr[-4000:]
        lines = [line for line in ANSI.sub("", done.stderr).splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and str(out) in lines[0], done.stderr[-4000:]
        return lines[0]

    new, new_seconds = make_shards_on_full_disk(disk / "new")
    new_error = error_line(new, disk / "new")
    assert "File too large" in new_error and "nothing was written" in new_error
    assert sorted(p.name for p in disk.iterdir()) == ["old"]  # no half-written folder, no temporary one

    again, again_seconds = make_shards_on_full_disk(old, "--overwrite")
    again_error = error_line(again, old)
    assert "the shards there are unchanged" in again_error
    assert sorted(p.name for p in disk.iterdir()) == ["old"]
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    for shard in old.rglob("*.parquet"):
        check_shard(shard, CLIPTimeTask.schema)  # still readable through
    print(
        f"\nRECOVERY: full disk (writes past {FULL_DISK_BYTES} bytes fail): a new folder -> exit 2 in "
        f"{new_seconds:.1f} s, {new_error!r}, nothing left behind; --overwrite -> exit 2 in {again_seconds:.1f} s, "
        f"{again_error!r}, the {len(before)} old files byte for byte as they were and readable"
    )
