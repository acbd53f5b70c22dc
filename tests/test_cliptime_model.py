import numpy as np
import pytest
import torch

from cliptime.errors import CliptimeError
from cliptime.tasks import make_task


def batch(task, n=4):
    prep = task.preprocessor()
    from cliptime.data.fungal_growth import generate_sequence

    cols = generate_sequence(0, 0, frames=n, size=64, hours=(0, 72), template_set="generic")
    out = prep({k: np.array(v, dtype=object if isinstance(v[0], (bytes, str)) else None) for k, v in cols.items()})
    return {k: torch.from_numpy(v) for k, v in out.items()}


@pytest.mark.parametrize("head,fusion", [("transformer", "sum"), ("mlp", "concat")])
def test_output_shapes_and_loss(head, fusion):
    task = make_task("cliptime", {"head": head, "fusion": fusion, "head_depth": 1})
    model = task.build_model()
    b = batch(task)
    logits, t = model(b["image"], b["tokens"])
    assert logits.shape == (4, 3) and t.shape == (4,)
    assert torch.all((t > 0) & (t < 1))
    loss, parts = task.loss(model, b)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"cls_loss", "time_loss"}
    assert model.time_head.out.weight.grad is not None if head == "transformer" else True


def test_loss_weights_are_applied():
    task = make_task("cliptime", {"cls_weight": 0.0, "time_weight": 2.0})
    model = task.build_model()
    model.eval()
    loss, parts = task.loss(model, batch(task))
    assert torch.isclose(loss, 2.0 * parts["time_loss"])


def test_frozen_backbone_gets_no_gradient():
    task = make_task("cliptime", {"freeze_backbone": True})
    model = task.build_model()
    loss, _ = task.loss(model, batch(task))
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.classifier.weight.grad is not None


def test_pretrained_file_is_loaded(tmp_path):
    import open_clip

    source = open_clip.create_model("cliptime-tiny-rn")
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    task = make_task("cliptime", {"pretrained": str(path)})
    loaded = task.build_model().backbone
    for k, v in source.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


@pytest.mark.parametrize(
    "config,named",
    [
        ({"model": "no-such-net"}, "no-such-net"),
        ({"pretrained": "/nonexistent/weights.pt"}, "/nonexistent/weights.pt"),
        ({"hours": (10.0, 10.0)}, "--hours"),
        ({"fusion": "product"}, "product"),
        ({"sequences": 3}, "--sequences"),
    ],
)
def test_bad_settings_fail_before_training(config, named):
    with pytest.raises(CliptimeError, match=named.replace("-", r"\-").replace(".", r"\.")):
        make_task("cliptime", config).check()


def test_predict_returns_stage_probabilities_and_hours():
    task = make_task("cliptime")
    model = task.build_model()
    out = task.predict(model, task.input_example())
    assert list(out.columns) == ["stage", "hours", "prob_spore", "prob_hyphae", "prob_mycelium"]
    assert np.isclose(out[["prob_spore", "prob_hyphae", "prob_mycelium"]].sum(axis=1), 1).all()
    assert 0 <= out["hours"][0] <= 72
