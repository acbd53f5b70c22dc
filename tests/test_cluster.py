"""The cluster path as far as one machine allows: cluster.yaml passes Ray's own validation, and a two-node
Ray cluster (two `ray start` processes, one cluster for the module) runs DDP and the training job with one worker
on each node, and a sweep submitted with `ray job submit` with a trial on each node."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import requests
import torch
import yaml

from cliptime.runtime import free_port
from tests.conftest import ROOT, last_json_line, ray_start, ray_stop, registered_versions, wait_started

CLUSTER_YAML = ROOT / "cluster.yaml"


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on any schema or consistency error

    nodes = config["available_node_types"]
    assert "GPU" not in nodes[config["head_node_type"]]["resources"]  # workers never land on the head
    assert any(n.get("resources", {}).get("GPU", 0) >= 1 for n in nodes.values())
    assert sum(n.get("min_workers", 0) for n in nodes.values()) <= config["max_workers"]
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert command.startswith(". ~/cliptime/.venv/bin/activate")  # jobs' `python` is the project's venv
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])

    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["node_confg"] = broken["available_node_types"]["head"].pop("node_config")
    with pytest.raises(Exception, match="node_confg"):
        validate_config(prepare_config(broken))


@dataclass
class TwoNodes:
    gcs: str  # what RAY_ADDRESS names for a driver on the cluster
    dashboard: str  # where `ray job submit` and the state API talk to it


def answers(url: str) -> bool:
    try:
        requests.get(url, timeout=5)  # any answer, "unauthorized" too: the server is up
        return True
    except requests.RequestException:  # refused, or too slow to answer yet
        return False


@pytest.fixture(scope="module")
def two_nodes():
    """A head started with `ray start --head` (token authentication on, the dashboard on 127.0.0.1) and a node
    joining it, 5 CPUs each, shared by the module's tests (a cluster's start and stop cost seconds each)."""
    port, dashboard = free_port(), free_port()
    head = ray_start(
        "--head", f"--port={port}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=5"
    )
    node = ray_start(f"--address=127.0.0.1:{port}", "--num-cpus=5")
    cluster = TwoNodes(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}")
    try:
        wait_started(head, node)
        deadline = time.time() + 120
        while not answers(cluster.dashboard):  # the state API is served there, and comes up after the head
            assert time.time() < deadline, f"no dashboard at {cluster.dashboard}:\n{head.said()[-3000:]}"
            time.sleep(0.5)
        yield cluster
    finally:
        ray_stop(head, node)


def train_workers(cluster: TwoNodes, env: dict) -> list[dict]:
    """Every Ray Train worker actor the cluster has had, from its own record (the state API): id and node."""
    list_workers = [
        *(sys.executable, "-m", "ray.scripts.scripts", "list", "actors", f"--address={cluster.dashboard}"),
        *("--filter", "class_name=RayTrainWorker", "--detail", "--format", "json", "--timeout", "120"),
    ]
    for _ in range(3):  # the state API can time out on a loaded machine
        listed = subprocess.run(list_workers, capture_output=True, text=True, env=env, timeout=300)
        if listed.returncode == 0:
            break
    assert listed.returncode == 0, listed.stderr[-2000:]
    return json.loads(listed.stdout)


@pytest.mark.slow
def test_two_node_cluster_syncs_ddp_across_nodes_and_runs_the_job(two_nodes, mlflow_store, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": two_nodes.gcs, "RAY_AUTH_MODE": "token"}
    env["MLFLOW_TRACKING_URI"] = mlflow_store
    ddp = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multinode_ddp.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["node"] != ranks[1]["node"]  # STRICT_SPREAD: one worker per node
    for name, w0 in ranks[0]["state"].items():
        assert torch.equal(w0, ranks[1]["state"][name]), name  # gradients averaged across the nodes
    moved = [n for n, w in ranks[0]["state"].items() if not torch.equal(w, ranks[0]["initial"][n])]
    assert len(moved) > 10  # the step changed the weights (from different data on each rank)

    job = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "train_cliptime.py"),
            *("--sequences", "7", "--frames", "10", "--image-size", "32", "--head-depth", "1"),
            *("--ffn-dim", "64", "--batch-size", "16", "--epochs", "1"),
            *("--num-workers", "2", "--cpus-per-worker", "1", "--placement-strategy", "STRICT_SPREAD"),
            *("--storage-path", str(tmp_path / "results"), "--experiment", "test-two-nodes"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    result = json.loads(job.stdout.strip().splitlines()[-1])
    assert result["model_version"] in {str(v.version) for v in registered_versions(mlflow_store, "cliptime")}


@pytest.mark.slow
def test_a_sweep_submitted_with_ray_job_submit_runs_a_trial_on_each_node_and_crowns_a_champion(
    two_nodes, empty_store, tmp_path
):
    """The sweep's two trials run at once, each with a 3-CPU worker, so one lands on each node (a node of 5 CPUs
    cannot hold two) and Ray Data keeps a whole CPU beside it; the client reads the saved token with
    RAY_AUTH_MODE=token."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    store = empty_store  # its own: the champion alias of a first sweep
    space = tmp_path / "two-nodes.yaml"
    tiny = {"sequences": 7, "frames": 10, "image_size": 32, "head_depth": 1, "ffn_dim": 64, "batch_size": 16}
    space.write_text(
        yaml.safe_dump(
            {
                "task": "cliptime",
                "metric": "val/accuracy_image_only",
                "num_samples": 2,
                "max_concurrent": 2,
                "scheduler": {"type": "fifo"},
                "fixed": {**tiny, "epochs": 2, "cpus_per_worker": 3},  # long enough to overlap
                "space": {"lr": {"loguniform": [0.001, 0.003]}},
            }
        )
    )
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": store}})
    submit = [
        *(sys.executable, "-m", "ray.scripts.scripts", "job", "submit", f"--address={two_nodes.dashboard}"),
        *("--working-dir", str(ROOT), f"--runtime-env-json={runtime_env}", "--"),
        *("python", "jobs/tune.py", str(space), "--storage-path", str(tmp_path / "results")),
    ]
    earlier = {w["actor_id"] for w in train_workers(two_nodes, env)}  # the module's other tests' workers
    # The job agent takes a few seconds more than the head to come up (longer on a loaded machine).
    not_up = ("Connection refused", "No available agent to submit job")
    for _ in range(60):
        proc = subprocess.run(submit, capture_output=True, text=True, env=env, timeout=900)
        if not any(message in proc.stderr + proc.stdout for message in not_up):
            break
        time.sleep(2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = last_json_line(proc.stdout)
    assert result["trials"] == 2
    assert result["model_version"] == result["champion_version"] == "1"  # the first sweep crowns its best
    assert registered_versions(store, "cliptime")
    nodes = [w["node_id"] for w in train_workers(two_nodes, env) if w["actor_id"] not in earlier]
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
