"""Data, shards, runs and their records in an S3 bucket: a moto S3 server on 127.0.0.1 stands in for the store.

pyarrow finds an S3-compatible endpoint in the URI (`?endpoint_override=HOST:PORT&scheme=http`) or in
AWS_ENDPOINT_URL. The tests' Ray workers started before these tests, without AWS_* variables, so the URIs given to
code that runs in them also carry the (fake) keys, as `s3://KEY:SECRET@bucket/...`; a user sets the keys in the
environment of every node instead (the URI is recorded with the run)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient
from moto.server import ThreadedMotoServer

from cliptime import train
from cliptime.convert import shard_folder, write_generated_shards, write_user_shards
from cliptime.data.shards import MANIFEST, open_shards, write_shards
from cliptime.data.timelapse import TimelapseConfig
from cliptime.errors import CliptimeError
from cliptime.runtime import Storage, free_port, joined
from cliptime.tasks import TASKS, make_task
from tests.conftest import last_json_line, registered_versions, run_job
from tests.test_webdataset import photo_shards

BUCKET = "cliptime-test"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclasses.dataclass
class S3:
    port: int
    client: object  # boto3's, to look into the bucket behind the code under test

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def uri(self, prefix: str) -> str:
        """s3://KEY:SECRET@BUCKET/PREFIX?endpoint_override=...: everything a Ray worker needs, in the URI."""
        return f"s3://testing:testing@{BUCKET}/{prefix}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def keys(self, prefix: str) -> list[str]:
        """The objects under `prefix` (not the empty `folder/` markers pyarrow writes)."""
        found = self.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        return sorted(o["Key"] for o in found if not o["Key"].endswith("/"))

    def checkpoints(self, prefix: str) -> set[str]:
        """The checkpoint folders of the Ray Train run at `prefix`."""
        return {k.rsplit("/", 1)[0] for k in self.keys(prefix) if k.endswith("/state.pt")}

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def s3():
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    yield S3(port, client)
    server.stop()


def test_run_records_in_a_bucket_with_the_endpoint_in_the_uri_or_the_environment(s3, monkeypatch):
    in_uri = Storage(s3.uri("records"))
    in_uri.write("cliptime-1", "cliptime_run.json", {"mlflow_run_id": "abc"})
    assert json.loads(s3.read("records/cliptime-1/cliptime_run.json")) == {"mlflow_run_id": "abc"}
    with in_uri.hold("cliptime-1"):
        assert "records/cliptime-1/cliptime.lock" in s3.keys("records/")
    assert s3.keys("records/") == ["records/cliptime-1/cliptime_run.json"]  # temporary file and lock gone

    for var, value in {**KEYS, "AWS_ENDPOINT_URL": s3.endpoint}.items():
        monkeypatch.setenv(var, value)
    from_env = Storage(f"s3://{BUCKET}/records")
    assert from_env.find("latest", "cliptime_run.json", what="cliptime run", prefix="cliptime-") == (
        "cliptime-1",
        {"mlflow_run_id": "abc"},
    )
    from_env.mark_finished("cliptime-1", "cliptime_run.json", model_version="3")
    with pytest.raises(CliptimeError, match=f"no unfinished cliptime run to resume under {BUCKET}/records"):
        from_env.find("latest", "cliptime_run.json", what="cliptime run", prefix="cliptime-")


def test_uri_query_stays_last_when_a_run_folder_is_joined():
    assert (
        joined("s3://b/runs/?endpoint_override=h:1&scheme=http", "r1")
        == "s3://b/runs/r1?endpoint_override=h:1&scheme=http"
    )
    assert joined("/tmp/runs/", "r1") == "/tmp/runs/r1"


@pytest.mark.slow
def test_webdataset_shards_in_a_bucket_to_shards_in_a_bucket(ray_session, s3, tmp_path, monkeypatch):
    """Tar shards read from the bucket, shards written to it (manifest last) and read back as training reads them;
    `--overwrite` replaces them; messages and manifests name the bucket without the keys or the endpoint. `--data`
    naming the tar shards in the bucket converts them into the local cache."""
    photo_shards(tmp_path / "tars")
    for tar in sorted((tmp_path / "tars").rglob("*.tar")):
        s3.client.upload_file(str(tar), BUCKET, f"tars/{tar.relative_to(tmp_path / 'tars')}")
    out = s3.uri("shards/photos")
    result = write_user_shards(TASKS["cliptime"], "webdataset-images", s3.uri("tars"), out, TimelapseConfig())
    assert result["out_dir"] == f"s3://{BUCKET}/shards/photos"
    assert result["manifest"]["source"]["webdataset"] == f"s3://{BUCKET}/tars"
    assert json.loads(s3.read(f"shards/photos/{MANIFEST}")) == result["manifest"]
    datasets, manifest = open_shards(out, "cliptime", TASKS["cliptime"].schema)
    assert {split: ds.count() for split, ds in datasets.items()} == {"train": 6, "val": 3, "test": 3}
    test = datasets["test"].take_all()  # one series of three photos
    assert manifest["splits"]["test"]["stage"] == {"hyphae": 1, "mycelium": 1, "spore": 1}
    assert sorted(r["frame"] for r in test) == [0, 1, 2] and len({r["sequence"] for r in test}) == 1
    first_files = s3.keys("shards/photos/train/")

    with pytest.raises(CliptimeError, match=f"output directory s3://{BUCKET}/shards/photos already exists"):
        write_user_shards(TASKS["cliptime"], "webdataset-images", s3.uri("tars"), out, TimelapseConfig())
    cfg = TimelapseConfig(image_size=32)
    write_user_shards(TASKS["cliptime"], "webdataset-images", s3.uri("tars"), out, cfg, overwrite=True)
    assert json.loads(s3.read(f"shards/photos/{MANIFEST}"))["source"]["image_size"] == 32
    assert not set(first_files) & set(s3.keys("shards/photos/"))  # the old shards are gone, not mixed in

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    converted = shard_folder(make_task("cliptime", {"data": s3.uri("tars")}))
    assert converted.startswith(str(tmp_path / "cache"))
    manifest = json.loads(Path(converted, MANIFEST).read_text())
    assert manifest["source"]["webdataset"] == f"s3://{BUCKET}/tars" and manifest["splits"]["test"]["rows"] == 3


def test_a_failed_write_to_a_bucket_leaves_nothing(ray_session, s3):
    task = make_task("cliptime", {"sequences": 7, "frames": 2, "image_size": 16})
    datasets = task.generate()
    datasets["val"] = datasets["val"].map(lambda row: 1 / 0)
    with pytest.raises(Exception, match="division by zero"):
        write_shards(datasets, s3.uri("failed"), task="cliptime", label="stage", source={})
    assert s3.keys("failed") == []


@pytest.mark.slow
def test_training_on_shards_in_a_bucket_keeps_its_checkpoints_and_record_there(
    ray_session, s3, empty_store, monkeypatch
):
    """`--data s3://...` and `--storage-path s3://...`: the toy job's checkpoint and record land in the bucket and its
    model is registered, its card naming the shards there. `--resume` finds the run in the bucket: finished, it is
    refused; as it would be after a stop, `--resume latest` finds it and its workers its newest checkpoint."""
    from cliptime import job
    from tests.toy_task import ToyConfig, ToyTask

    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store)
    write_generated_shards(ToyTask(ToyConfig(rows=32)), s3.uri("toy"))
    task = ToyTask(ToyConfig(data=s3.uri("toy"), hidden=8))
    result = job.run(task, ToyTask.train_config(epochs=1, storage_path=s3.uri("runs"), name="toy-s3", experiment="s3"))
    assert len(s3.checkpoints("runs/toy-s3/")) == 1
    record = json.loads(s3.read(f"runs/toy-s3/{job.RUN_RECORD}"))
    assert record["finished"] and record["model_version"] == result.model_version
    assert [str(v.version) for v in registered_versions(empty_store, "toy")] == [result.model_version]
    card = MlflowClient(empty_store).get_model_version("toy", result.model_version).description
    assert f"`s3://{BUCKET}/toy`" in card  # the shards, read from the bucket's manifest, named without keys

    with pytest.raises(CliptimeError, match="--resume toy-s3: that run finished"):
        job.run(task, ToyTask.train_config(resume="toy-s3", storage_path=s3.uri("runs")))
    storage = Storage(s3.uri("runs"))
    stopped = {k: v for k, v in record.items() if k not in ("finished", "model_version", "task_name")}
    storage.write("toy-s3", job.RUN_RECORD, stopped)
    assert storage.find("latest", job.RUN_RECORD, what="toy run", prefix="toy-") == ("toy-s3", stopped)
    state, history = train.load_newest_intact(joined(s3.uri("runs"), "toy-s3"), "cpu")
    assert state["epoch"] == 0 and [h["epoch"] for h in history] == [0]


@pytest.mark.slow
def test_make_shards_job_with_the_endpoint_from_the_environment(s3, tmp_path):
    """The job as a user runs it: keys and endpoint in the environment (AWS_ENDPOINT_URL), a plain s3:// output;
    its own Ray's workers inherit them."""
    photo_shards(tmp_path / "tars")
    env = {**KEYS, "AWS_ENDPOINT_URL": s3.endpoint}
    done = run_job("make_shards.py", "webdataset-images", str(tmp_path / "tars"), f"s3://{BUCKET}/env/shards", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = last_json_line(done.stdout)["manifest"]
    assert {s: manifest["splits"][s]["rows"] for s in ("train", "val", "test")} == {"train": 6, "val": 3, "test": 3}
    assert json.loads(s3.read(f"env/shards/{MANIFEST}")) == manifest
