"""T-CLAP end to end in-process on the shared Ray instance: train with its plain-CLAP baseline -> register ->
predict."""

import io

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from mlflow.tracking import MlflowClient

from cliptime import job
from cliptime.tasks.tclap import TCLAPTask
from tests.conftest import registered_versions

pytestmark = pytest.mark.slow


def test_tclap_run_trains_baseline_and_registers(ray_session, tracking, tmp_path, capsys):
    # two micro-batches of 4 per optimizer step: the gradient-accumulation path
    tc = TCLAPTask.train_config(epochs=1, batch_size=8, grad_accum=2, storage_path=str(tmp_path), experiment="t")
    result = job.run(TCLAPTask.tiny(), tc)
    assert result.model_name == "tclap"
    assert result.model_version in {str(v.version) for v in registered_versions(tracking, "tclap")}
    for key in (
        "test/tclassify_a2t",
        "test/tclassify_t2a",
        "test/tclassify_a2t_heldout_phrasing",
        "test/tclassify_t2a_heldout_phrasing",
        "test/a2t_R10",
        "test/zeroshot_accuracy",
        "baseline/test/tclassify_a2t",
        "baseline/test/zeroshot_accuracy",
    ):
        assert np.isfinite(result.metrics[key]), key

    client = MlflowClient(tracking)
    run = client.get_run(result.run_id)
    assert run.data.params["task.temporal_weight"] == "0.5"
    assert {a.path for a in client.list_artifacts(result.run_id, "plots")} == {"plots/tclassify_vs_baseline.png"}
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert len(children) == 1
    assert children[0].data.params["task.temporal_weight"] == "0.0"  # plain CLAP: its loss and its pooling
    assert children[0].data.params["task.order_pooling"] == "False"
    assert [m.step for m in client.get_metric_history(children[0].info.run_id, "train/loss")] == [0]

    mlflow.set_tracking_uri(tracking)
    model = mlflow.pyfunc.load_model(f"models:/tclap/{result.model_version}")
    buf = io.BytesIO()
    sf.write(buf, np.random.default_rng(0).normal(0, 0.1, 32000).astype(np.float32), 16000, format="WAV")
    out = model.predict(pd.DataFrame({"audio": [buf.getvalue()] * 2, "caption": ["knocking", "a low buzz"]}))
    assert list(out.columns) == ["caption", "score"] and np.isfinite(out["score"]).all()

    # the prediction command: which order does a clip play?
    import json

    from cliptime.cli import predict_main
    from cliptime.data.sound_events import from_pcm16, generate_block

    cols = generate_block(
        0,
        "test",
        0,
        pairs=1,
        singles=0,
        sample_rate=16000,
        clip_seconds=2.0,
        gap_seconds=(0.0, 0.0),
        template_set="basic",
    )
    wav = tmp_path / "clip.wav"
    sf.write(wav, from_pcm16(cols["audio"][0]), 16000)
    argv = [f"models:/tclap/{result.model_version}", str(wav), "--order", "knocking", "a low buzz"]
    assert predict_main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(out["order"]) == ["a low buzz", "knocking"] and len(out["ranking"]) == 2
