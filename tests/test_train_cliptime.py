"""CLIPTime end to end in-process on the shared Ray instance: train -> register -> predict -> resume."""

import json

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cliptime import job
from cliptime.errors import CliptimeError
from cliptime.tasks import make_task
from cliptime.tasks.cliptime import CLIPTimeTask
from tests.conftest import registered_versions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(ray_session, mlflow_store, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    storage = tmp_path_factory.mktemp("ray_results")
    tc = CLIPTimeTask.train_config(epochs=2, batch_size=16, storage_path=str(storage), experiment="test-cliptime")
    result = job.run(CLIPTimeTask.tiny(), tc)
    yield result, storage, tc
    mp.undo()


def test_run_registers_a_version_with_test_metrics(trained, mlflow_store):
    result, _, _ = trained
    assert result.model_name == "cliptime" and result.model_version is not None
    versions = registered_versions(mlflow_store, "cliptime")
    assert result.model_version in {str(v.version) for v in versions}
    for key in (
        "test/accuracy_image_only",
        "test/accuracy",
        "test/accuracy_grayscale",
        "test/accuracy_hue_shift",
        "test/macro_f1",
        "test/time_mae_hours_image_only",
        "test/time_mae_hours",
    ):
        assert key in result.metrics
    json.dumps(result.metrics)


def test_mlflow_run_has_params_epoch_history_and_plots(trained, mlflow_store):
    result, _, _ = trained
    client = MlflowClient(mlflow_store)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["task.fusion"] == "sum" and run.data.params["train.epochs"] == "2"
    history = client.get_metric_history(result.run_id, "val/accuracy")
    assert sorted(m.step for m in history) == [0, 1]
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert artifacts == {"plots/confusion_matrix.png", "plots/time_pred_vs_true.png"}


def test_checkpoint_per_epoch_and_resume_continues(trained, mlflow_store, monkeypatch):
    result, storage, tc = trained
    run_dir = storage / result.run_name
    assert (run_dir / job.RUN_RECORD).exists()
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == 2  # one per epoch, two kept
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    # A finished run is not resumed: no epoch trained or logged again, no second version.
    finished = f"that run finished and registered cliptime version {result.model_version}"
    with pytest.raises(CliptimeError, match=finished):
        job.run(make_task("cliptime"), CLIPTimeTask.train_config(resume=result.run_name, storage_path=str(storage)))
    history = MlflowClient(mlflow_store).get_metric_history(result.run_id, "train/loss")
    assert sorted(m.step for m in history) == [0, 1]
    assert [str(v.version) for v in registered_versions(mlflow_store, "cliptime") if v.run_id == result.run_id] == [
        result.model_version
    ]


def test_registered_model_predicts_from_the_registry(trained, mlflow_store):
    result, _, _ = trained
    mlflow.set_tracking_uri(mlflow_store)
    model = mlflow.pyfunc.load_model(f"models:/cliptime/{result.model_version}")
    task = make_task("cliptime")
    out = model.predict(pd.concat([task.input_example()] * 2, ignore_index=True))
    assert len(out) == 2 and set(out["stage"]) <= {"spore", "hyphae", "mycelium"}


def test_predict_on_an_image_a_folder_and_a_wrong_file(trained, mlflow_store, monkeypatch, tmp_path, capsys):
    from cliptime.cli import predict_main
    from cliptime.data.fungal_growth import generate_sequence

    def answer(*argv: str) -> tuple[int, dict | str]:
        code = predict_main(list(argv))
        out, err = capsys.readouterr()
        return code, json.loads(out.strip().splitlines()[-1]) if code == 0 else err

    result, _, _ = trained
    uri = f"models:/cliptime/{result.model_version}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    cols = generate_sequence(0, 0, frames=5, size=32, hours=(0, 72), template_set="generic")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, data in enumerate(cols["image"]):
        (folder / f"frame{i}.png").write_bytes(data)
    code, out = answer(uri, str(folder / "frame0.png"), "--caption", "fungal spores")
    assert code == 0 and out["stage"] in ("spore", "hyphae", "mycelium") and 0 <= out["hours"] <= 72
    table = tmp_path / "preds.csv"
    code, out = answer(uri, str(folder), "--out", str(table))
    assert code == 0 and out["images"] == 5
    assert len(pd.read_csv(table)) == 5 and {"path", "stage", "hours"} <= set(pd.read_csv(table).columns)
    (tmp_path / "notes.png").write_text("not an image")
    assert answer(uri, str(tmp_path / "notes.png")) == (
        2,
        "error: input row 0: not a readable image (UnidentifiedImageError)\n",
    )
    code, err = answer(uri, str(folder / "frame0.png"), "--order", "a bell", "knocking")
    assert code == 2 and "is a CLIPTime model: --order is for T-CLAP" in err
    code, err = answer("models:/no-such-model/1", str(folder / "frame0.png"))
    assert code == 2 and "cannot load model models:/no-such-model/1" in err
