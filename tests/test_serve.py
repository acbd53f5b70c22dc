"""Serving on Ray Serve (cliptime/serve.py, jobs/serve.py): real HTTP requests against tiny registered CLIPTime and
T-CLAP models (untrained: serving does not care what they learned, and their answers still depend on every
input), compared with `task.predict` in this process on the same inputs.

The module's apps share one Serve on the session's Ray, each under its own route prefix; the alias-swap test moves
`champion` of the CLIPTime app and so runs after the tests that expect version 1."""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import soundfile as sf
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from cliptime.cli import serve_main
from cliptime.errors import CliptimeError
from cliptime.predict import load
from cliptime.registry import log_and_register
from cliptime.runtime import free_port
from cliptime.serve import build, settings
from cliptime.tasks.cliptime import CLIPTimeTask
from cliptime.tasks.tclap import TCLAPTask
from tests.chromium import Page
from tests.conftest import ROOT


@dataclass(frozen=True)
class App:
    url: str  # the Serve proxy, http://127.0.0.1:PORT
    port: int
    store: str  # the tracking store the models are registered in


def register(store: str, task, seed: int) -> str:
    """A version of `task`'s model with weights drawn from `seed`, registered in `store`."""
    mlflow.set_tracking_uri(store)
    torch.manual_seed(seed)
    with mlflow.start_run():
        return log_and_register(task, task.build_model(load_pretrained=False).eval(), True, {})


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def wav(seed: int, rate: int, samples: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.random.default_rng(seed).normal(0, 0.1, samples).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def app(ray_session, migrated_store_file, tmp_path_factory):
    """A CLIPTime app serving `models:/cliptime@champion` (re-read every 0.5 s) at /cliptime; a T-CLAP version
    registered beside it for jobs/serve.py to serve."""
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    shutil.copy(migrated_store_file, root / "mlflow.db")
    store = f"sqlite:///{root / 'mlflow.db'}"
    assert register(store, CLIPTimeTask.tiny(), seed=0) == "1"
    assert register(store, TCLAPTask.tiny(), seed=0) == "1"
    MlflowClient(store).set_registered_model_alias("cliptime", "champion", "1")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {"tracking": store, "reload_alias": 0.5, "max_batch_size": 8, "batch_wait_ms": 50, "max_bytes": 1 << 20}
    serve.run(build({"model": "models:/cliptime@champion", **settings}), name="t-cliptime", route_prefix="/cliptime")
    yield App(f"http://127.0.0.1:{port}", port, store)
    serve.shutdown()


def post(url: str, body: bytes = b"", **kwargs) -> requests.Response:
    return requests.post(url, data=body, timeout=120, **kwargs)


@pytest.mark.slow
def test_a_prediction_over_http_is_predict_in_process(app):
    image = png(0)
    r = post(
        f"{app.url}/cliptime/predict", image, params={"caption": "fungal hyphae"}, headers={"Content-Type": "image/png"}
    )
    assert r.status_code == 200, r.text
    got = r.json()
    task, model = load("models:/cliptime/1", app.store)
    want = task.predict(model, pd.DataFrame({"image": [image], "caption": ["fungal hyphae"]})).iloc[0]
    assert got["model"] == "models:/cliptime/1"
    assert got["stage"] == want["stage"]
    for key in ("hours", "prob_spore", "prob_hyphae", "prob_mycelium"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    as_json = post(
        f"{app.url}/cliptime/predict", json={"data": base64.b64encode(image).decode(), "caption": "fungal hyphae"}
    )
    assert as_json.status_code == 200 and as_json.json() == pytest.approx(got)
    neutral = post(f"{app.url}/cliptime/predict", image).json()  # the caption is used: without it, another answer
    assert neutral["hours"] != pytest.approx(got["hours"], rel=1e-4)

    served = requests.get(f"{app.url}/cliptime/model", timeout=30).json()
    assert {k: served[k] for k in ("name", "alias", "version", "source", "task")} == {
        "name": "cliptime",
        "alias": "champion",
        "version": "1",
        "source": "models:/cliptime/1",
        "task": "cliptime",
    }
    assert requests.get(f"{app.url}/cliptime/healthz", timeout=30).json()["status"] == "ok"
    assert requests.get(f"{app.url}/-/healthz", timeout=30).status_code == 200  # Ray Serve's proxy


@pytest.mark.slow
def test_the_page_has_a_field_per_flag_and_posts_under_the_apps_prefix(app):
    page = requests.get(f"{app.url}/cliptime/", timeout=30)
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert 'data-flag="caption"' in page.text and '"/cliptime/predict?"' in page.text


@pytest.mark.slow
def test_a_file_picked_on_the_page_in_chromium_shows_the_models_answer(app, tmp_path):
    """The page in a real browser (headless Chromium): a photo picked in its file field, with a caption typed in,
    is posted by the page's script and its answer shown, as `task.predict` gives it. The screenshot is kept beside
    the test's files (page.png)."""
    photo = tmp_path / "photo.png"
    photo.write_bytes(png(3))
    page = Page()
    try:
        page.open(f"{app.url}/cliptime/")
        page.evaluate("document.querySelector('[data-flag=caption]').value = 'fungal hyphae'")
        page.pick_file("#file", photo)
        page.wait_for("document.getElementById('out').dataset.status")
        status, shown = page.evaluate("document.getElementById('out').textContent").split("\n", 1)
        (tmp_path / "page.png").write_bytes(page.screenshot())
    finally:
        page.close()
    assert status == "200", shown
    task, model = load("models:/cliptime/1", app.store)
    want = task.predict(model, pd.DataFrame({"image": [png(3)], "caption": ["fungal hyphae"]})).iloc[0]
    answer = json.loads(shown)
    assert answer["stage"] == want["stage"] and answer["hours"] == pytest.approx(want["hours"], rel=1e-4)
    assert Image.open(tmp_path / "page.png").size == (900, 900)  # what a user sees, drawn


@pytest.mark.slow
def test_fifty_concurrent_requests_are_batched_and_a_bad_one_fails_alone(app):
    before = requests.get(f"{app.url}/cliptime/healthz", timeout=30).json()
    images = [png(i) for i in range(50)]
    bodies = [*images[:25], b"not an image", *images[25:]]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post(f"{app.url}/cliptime/predict", b), bodies))
    assert [r.status_code for r in responses] == [200] * 25 + [400] + [200] * 25
    assert "not a readable image" in responses[25].json()["error"]
    answers = [r.json() for r in responses[:25] + responses[26:]]
    task, model = load("models:/cliptime/1", app.store)
    want = task.predict(model, pd.DataFrame({"image": images}))
    assert [a["stage"] for a in answers] == list(want["stage"])
    assert [a["hours"] for a in answers] == pytest.approx(list(want["hours"]), rel=1e-4)
    after = requests.get(f"{app.url}/cliptime/healthz", timeout=30).json()
    assert after["requests"] - before["requests"] == 51
    assert after["batches"] - before["batches"] <= 40  # batched: many requests answered together


@pytest.mark.slow
def test_bad_requests_get_a_4xx_naming_the_problem_and_serving_goes_on(app):
    url = f"{app.url}/cliptime/predict"
    audio = wav(0, 16000, 16000)
    bad = [
        (dict(data=b"hello", headers={"Content-Type": "image/png"}), 400, "not a readable image"),
        (dict(data=b""), 400, "empty body"),
        (dict(data=audio, headers={"Content-Type": "audio/wav"}), 415, "a CLIPTime model takes png"),
        (dict(data=audio), 400, "not a readable image"),  # the other task's input, its type unsaid
        (dict(data=png(0), params={"captions": "a bell"}), 400, "captions is for T-CLAP models"),
        (dict(data=png(0), params={"captoin": "x"}), 400, "unknown parameter 'captoin'"),
        (dict(data=png(0), params=[("caption", "a"), ("caption", "b")]), 400, "caption takes one value"),
        (dict(data=b"{", headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
        (dict(json={"caption": "x"}), 400, 'needs "data"'),
        (dict(json={"data": "%%%"}), 400, "not valid base64"),
        (dict(data=b"x" * ((1 << 20) + 1)), 413, "larger than 1048576 bytes"),
    ]
    for kwargs, status, message in bad:
        r = requests.post(url, timeout=120, **kwargs)
        assert (r.status_code, r.headers["content-type"]) == (status, "application/json"), (kwargs.keys(), r.text)
        assert message in r.json()["error"], r.json()
    assert post(url, png(1)).status_code == 200


def test_the_serve_config_is_this_app_with_valid_settings():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve" / "cliptime.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "cliptime.serve:build"
    assert [d.name for d in application.deployments] == ["ModelServer"]
    assert settings({**application.args, "tracking": "sqlite:///x.db"}).model == "models:/cliptime@champion"
    assert config.http_options.host == "127.0.0.1"


@pytest.mark.slow
def test_jobs_serve_serves_tclap_as_predict_does_and_ctrl_c_stops_it(app, monkeypatch, capsys):
    """serve_main as jobs/serve.py runs it, with a T-CLAP model, on the session's Ray (so Ctrl-C deletes its app and
    leaves Serve and the other apps running). A client thread sends the requests, then Ctrl-C."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", app.store)
    task, model = load("models:/tclap/1", app.store)
    clip = wav(1, task.model_audio["sample_rate"], task.model_audio["clip_samples"])
    ranked = argparse.Namespace(captions=["a bell followed by knocking", "a low buzz"], order=None)
    ordered = argparse.Namespace(captions=[], order=["a ringing bell", "knocking"])
    requests_ = {
        "ranked": dict(data=clip, params=[("captions", c) for c in ranked.captions]),
        "ordered": dict(data=clip, params=[("order", e) for e in ordered.order], headers={"Content-Type": "audio/wav"}),
        "an image": dict(data=png(0), params={"captions": "a bell"}),
        "no captions": dict(data=clip),
        "one event to order": dict(data=clip, params={"order": "a bell"}),
    }
    got: dict[str, requests.Response] = {}
    main, done = threading.main_thread().ident, threading.Event()

    def client():
        try:
            deadline = time.time() + 120
            while time.time() < deadline and "model" not in got and not done.is_set():
                if (r := requests.get(f"{app.url}/model", timeout=120)).status_code == 200:
                    got["model"] = r
                time.sleep(0.5)
            got["page"] = requests.get(f"{app.url}/", timeout=30)
            for name, kwargs in requests_.items():
                got[name] = requests.post(f"{app.url}/predict", timeout=120, **kwargs)
        except Exception as e:
            got["error"] = e
        finally:
            if not done.is_set():  # never a Ctrl-C for pytest itself
                signal.pthread_kill(main, signal.SIGINT)  # Ctrl-C

    # Ctrl-C as at a terminal, however pytest was started (a shell's background job ignores SIGINT)
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=client, daemon=True).start()
    try:
        code = serve_main(["models:/tclap/1", "--port", str(app.port)])
    finally:
        done.set()
        signal.signal(signal.SIGINT, previous_sigint)
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["stopped"] and result["served"] == "models:/tclap/1"
    assert requests.get(f"{app.url}/model", timeout=30).status_code == 404  # its app is gone
    assert requests.get(f"{app.url}/cliptime/model", timeout=30).status_code == 200  # the others serve on

    assert "error" not in got, got["error"]
    assert got["model"].json()["task"] == "tclap"
    assert "<textarea" in got["page"].text and got["page"].text.count('data-flag="order"') == 2
    for name, args in (("ranked", ranked), ("ordered", ordered)):
        assert got[name].status_code == 200, got[name].text
        want = task.prediction_result(task.predict(model, task.prediction_rows(clip, args)), args)
        answer = got[name].json()
        assert [x["caption"] for x in answer["ranking"]] == [x["caption"] for x in want["ranking"]]
        assert [x["score"] for x in answer["ranking"]] == pytest.approx([x["score"] for x in want["ranking"]], abs=1e-5)
        assert answer.get("order") == want.get("order")
    for name, message in [
        ("an image", "not a readable audio file"),
        ("no captions", "give candidate captions"),
        ("one event to order", "order takes 2 values"),
    ]:
        assert got[name].status_code == 400 and message in got[name].json()["error"], got[name].text


@pytest.mark.slow
def test_moving_the_alias_swaps_the_served_version_without_dropping_requests(app):
    image = png(7)
    url = f"{app.url}/cliptime/predict"
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            r = post(url, image)
            seen.append((r.status_code, r.json()["model"] if r.ok else r.text))

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        version = register(app.store, CLIPTimeTask.tiny(), seed=1)
        MlflowClient(app.store).set_registered_model_alias("cliptime", "champion", version)
        deadline = time.time() + 60
        while requests.get(f"{app.url}/cliptime/model", timeout=30).json()["version"] != version:
            assert time.time() < deadline, "the new champion was not swapped in"
            time.sleep(0.2)
        time.sleep(1)
    finally:
        stop.set()
        thread.join()
    assert {status for status, _ in seen} == {200}
    models = [m for _, m in seen]
    swap = models.index(f"models:/cliptime/{version}")
    assert swap > 0  # requests were answered on both sides of the swap
    assert set(models[:swap]) == {"models:/cliptime/1"} and set(models[swap:]) == {f"models:/cliptime/{version}"}
    task, model = load(f"models:/cliptime/{version}", app.store)
    want = task.predict(model, pd.DataFrame({"image": [image]})).iloc[0]
    assert post(url, image).json()["hours"] == pytest.approx(want["hours"], rel=1e-4)


def test_a_missing_alias_or_a_bad_setting_is_one_line_before_anything_deploys(empty_store):
    with pytest.raises(CliptimeError, match="cannot load model models:/cliptime@nobody"):
        build({"model": "models:/cliptime@nobody", "tracking": empty_store})
    with pytest.raises(CliptimeError, match="cannot load model models:/cliptime/99"):
        build({"model": "models:/cliptime/99", "tracking": empty_store})
    with pytest.raises(CliptimeError, match="--reload-alias re-reads an alias: models:/cliptime/1 names none"):
        build({"model": "models:/cliptime/1", "tracking": empty_store, "reload_alias": 5})
    with pytest.raises(CliptimeError, match="serve settings: replicas: Input should be greater than or equal to 1"):
        build({"model": "models:/cliptime/1", "tracking": empty_store, "replicas": 0})
    with pytest.raises(CliptimeError, match="serve settings: modle: Extra inputs are not permitted"):
        build({"modle": "models:/cliptime/1", "model": "x"})


def test_jobs_serve_listens_on_loopback_unless_told_otherwise(monkeypatch, capsys):
    """`jobs/serve.py` serves on 127.0.0.1 by default (the address `cliptime.serve.run` gives Ray Serve's HTTP
    proxy), and on another address only when `--host` names it."""
    import cliptime.serve

    asked = []
    monkeypatch.setattr(cliptime.serve, "run", lambda args, host, port: asked.append((host, port)) or {})
    for argv in ([], ["--host", "0.0.0.0", "--port", "8123"]):
        assert serve_main(["models:/cliptime/1", *argv]) == 0
    assert asked == [("127.0.0.1", 8000), ("0.0.0.0", 8123)]
