"""End to end, as a user runs it: a job killed with its local Ray (SIGKILL of the driver and every process it
started) and resumed. (`ray job submit` to a cluster started with `ray start`: tests/test_cluster.py.)"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from cliptime import train
from tests.conftest import ROOT, registered_versions

pytestmark = pytest.mark.slow

TINY_CLIPTIME = [
    "--sequences",
    "7",
    "--frames",
    "10",
    "--image-size",
    "32",
    "--head-depth",
    "1",
    "--ffn-dim",
    "64",
    "--batch-size",
    "16",
    "--cpus-per-worker",
    "1",
]


def kill_once_checkpointed(cmd: list[str], env: dict, cwd, storage, pattern: str, timeout: float = 400) -> None:
    """Start `cmd` and SIGKILL it with every process it started (its local Ray and the training workers), at once,
    as soon as a checkpoint directory matching `pattern` exists under `storage`; return once all are gone.

    Ray's workers are not in the driver's process group: killed with the group alone, a training worker went on
    copying a checkpoint it had begun until it found its raylet gone, after the test had read the half-copied
    checkpoint."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd, start_new_session=True
    )
    deadline = time.time() + timeout
    while time.time() < deadline and not list(storage.glob(pattern)):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.5)
    driver = psutil.Process(proc.pid)
    everyone = [driver, *driver.children(recursive=True)]
    for p in everyone:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    _, alive = psutil.wait_procs(everyone, timeout=60)
    assert not alive, alive
    proc.wait()


def epochs_in_newest_readable_checkpoint(storage: Path) -> int:
    """The epochs a resumed job need not train again: those of the checkpoint the job resumes from, the newest that
    can be read (`train.load_newest_intact`). The kill can land while a checkpoint is being written out, and the job
    then resumes from the one before."""
    run_folder = next(storage.glob("*/checkpoint_*")).parent
    _, history = train.load_newest_intact(str(run_folder), "cpu", say=lambda line: None)
    return len(history)


def test_killed_job_resumes_from_its_checkpoint_with_one_history(mlflow_store, tmp_path):
    """The job script killed with its local Ray once a checkpoint exists (its lock and its RUNNING MLflow run left
    behind, as after a crash), then `--resume` trains the rest in the same run. The resumed job's whole output is
    what a person reads: a line naming the log file, one line per epoch, a short summary, and the JSON line last,
    in few lines; Ray's and MLflow's own logs are in the log file."""
    storage = tmp_path / "ray_results"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "train_cliptime.py"),
        *TINY_CLIPTIME,
        "--epochs",
        "4",
        "--storage-path",
        str(storage),
        "--experiment",
        "e2e-resume",
    ]
    kill_once_checkpointed(cmd, env, tmp_path, storage, "*/checkpoint_2*")
    done_before = epochs_in_newest_readable_checkpoint(storage)
    assert 1 <= done_before < 4

    resume = [sys.executable, str(ROOT / "jobs" / "train_cliptime.py"), "--resume", "--storage-path", str(storage)]
    proc = subprocess.run(resume, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert len(out) + len(proc.stderr.splitlines()) <= 80, proc.stdout + proc.stderr
    result = json.loads(out[-1])  # the last stdout line is the JSON object and nothing else
    client = MlflowClient(mlflow_store)
    steps = sorted(m.step for m in client.get_metric_history(result["run_id"], "train/loss"))
    assert steps == [0, 1, 2, 3]  # every epoch once: none lost, none logged twice
    assert "ended_at" not in client.get_run(result["run_id"]).data.metrics  # history bookkeeping, not a metric
    assert client.get_run(result["run_id"]).info.status == "FINISHED"
    assert result["model_version"] in {str(v.version) for v in registered_versions(mlflow_store, "cliptime")}
    seconds = result["seconds"]
    assert 0 < seconds["training"] and 0 < seconds["validation"]
    assert seconds["training"] + seconds["validation"] < seconds["total"]
    for name, metric in (("training", "step_seconds"), ("validation", "val_seconds")):  # this job's epochs only
        mine = [m.value for m in client.get_metric_history(result["run_id"], metric) if m.step >= done_before]
        assert seconds[name] == pytest.approx(sum(mine), abs=0.1)

    assert out[0].startswith(f"resuming {result['run_name']}")
    assert out[1].startswith("logs: ")  # named once, before anything else happens
    log = Path(out[1].removeprefix("logs: "))
    assert log.parent == storage / result["run_name"]
    assert "Started a local Ray instance" in log.read_text()
    assert sum(line.startswith("epoch ") for line in out) == 4 - done_before  # the epochs this job trained
    assert f"model: cliptime version {result['model_version']}" in proc.stdout
    assert f"browse: mlflow ui --backend-store-uri {mlflow_store}" in proc.stdout
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_a_job_script_exits_with_its_code_and_its_heap_frozen():
    """The job scripts end through `cliptime.cli.exit_process`: the code comes through, the objects alive at exit
    are frozen (out of the final garbage collections) when the atexit handlers run, and the handlers still run."""
    code = (
        "import atexit, gc\n"
        "from cliptime.cli import exit_process\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count()))\n"
        "exit_process(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert int(proc.stdout.removeprefix("frozen at exit:")) > 100_000  # the imported libraries' objects
    for script in sorted((ROOT / "jobs").glob("*.py")):
        assert "\n    exit_process(" in script.read_text(), script
