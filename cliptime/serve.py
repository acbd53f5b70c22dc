"""Serve a registered model over HTTP on Ray Serve: `python jobs/serve.py models:/cliptime@champion`, or the
config file serve/cliptime.yaml (`serve run` / `serve deploy`), whose application is `cliptime.serve:build`.

One deployment, `ModelServer`; each replica loads the version once, pickle-free (`cliptime.predict.load`), and
answers

    POST /predict   the file as the body, the task's predict flags as query parameters (`caption`; `captions`,
                    `order`), or JSON {"data": <base64 file>, "caption": ...} -> the JSON answer of jobs/predict.py
    GET  /          a page to drop a file on and see the answer
    GET  /healthz   answered by a replica whose model is loaded (Ray Serve's proxy answers /-/healthz itself)
    GET  /model     the registered version served

Requests are batched (`serve.batch`): the rows of the requests that wait are predicted in one `task.predict` call,
off the event loop, so throughput grows with load. With `reload_alias` seconds a replica re-reads the alias of a
`models:/NAME@ALIAS` URI and, when it names another version, loads that one beside the old and swaps it in; a
batch runs on the version it started with, so no request is dropped. A bad request gets a 4xx JSON
{"error": ...} naming the problem (a CliptimeError's message), and the replica goes on serving.
"""

import argparse
import asyncio
import base64
import binascii
import datetime
import html
import json
import logging
import mimetypes
import os
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application

from cliptime.errors import CliptimeError
from cliptime.predict import load
from cliptime.tasks import TASKS
from cliptime.tasks.base import Task
from cliptime.tracking import redacted, tracking_uri

APP = "cliptime"  # the Serve application's name (jobs/serve.py, serve/cliptime.yaml)
MAX_ROWS = 256  # model inputs one request may make (T-CLAP: one per caption)
ALIAS_URI = r"models:/([^/@]+)@([^/@]+)"  # models:/NAME@ALIAS
logger = logging.getLogger("ray.serve")


class ServeArgs(BaseModel):
    """The app's settings: jobs/serve.py's flags, and `args` of the application in a Serve config file."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key in a config file is named, not ignored

    model: str  # any model URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model
    tracking: str = ""  # the tracking store (default: MLFLOW_TRACKING_URI where the app is built, else ./mlflow.db)
    reload_alias: float = Field(0, ge=0)  # seconds between re-reads of the alias (0: never)
    max_batch_size: int = Field(16, ge=1)  # requests predicted together
    batch_wait_ms: float = Field(10, ge=0)  # how long a batch waits to fill
    max_bytes: int = Field(32 << 20, ge=1)  # the largest body taken
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1, ge=0)  # per replica: its torch threads
    num_gpus: float = Field(0, ge=0)  # per replica: a replica given a GPU predicts on it


class HTTPError(CliptimeError):
    """A bad request whose status is not 400 (413: too large, 415: a file of the other task's kind)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# -- the version served ---------------------------------------------------------------------------------------
def resolve(uri: str, tracking: str) -> dict[str, str | None]:
    """Which version `uri` names now: {uri, name, alias, version, source}. `source` is the URI of exactly that
    version, so the weights loaded are those of the version reported, even if the alias moves meanwhile."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    info: dict[str, str | None] = {"uri": uri, "name": None, "alias": None, "version": None, "source": uri}
    if m := re.fullmatch(ALIAS_URI, uri):
        name, alias = m.groups()
        try:
            version = str(MlflowClient(tracking).get_model_version_by_alias(name, alias).version)
        except MlflowException as e:
            raise CliptimeError(f"cannot load model {uri}: {str(e).splitlines()[0]}") from None
        return {**info, "name": name, "alias": alias, "version": version, "source": f"models:/{name}/{version}"}
    if m := re.fullmatch(r"models:/([^/@]+)/(\d+)", uri):
        try:
            MlflowClient(tracking).get_model_version(m[1], m[2])
        except MlflowException as e:
            raise CliptimeError(f"cannot load model {uri}: {str(e).splitlines()[0]}") from None
        return {**info, "name": m[1], "version": m[2]}
    return info


@dataclass(frozen=True)
class Served:
    """One loaded version: its task, its model, and what GET /model says of it."""

    task: Task
    model: torch.nn.Module
    info: dict[str, Any]


def load_version(uri: str, tracking: str, device: str) -> Served:
    info = resolve(uri, tracking)
    task, model = load(str(info["source"]), tracking)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return Served(task, model.to(device), {**info, "task": task.name, "title": task.title, "loaded_at": when})


# -- requests -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One request's model inputs (`task.prediction_rows`) and the predict flags its answer is made with."""

    rows: pd.DataFrame
    args: argparse.Namespace


def predict_flags(task_cls: type[Task]) -> dict[str, argparse.Action]:
    """A task's own flags of jobs/predict.py (`--caption`; `--captions`, `--order`) by name: what a request sets."""
    parser = argparse.ArgumentParser(add_help=False)
    task_cls.add_predict_args(parser.add_argument_group())
    return {a.dest: a for a in parser._actions}


def task_args(task: Task, given: dict[str, list[str]]) -> argparse.Namespace:
    """The predict flags of a request: the task's defaults with the `given` values, each checked as argparse would
    (one value, one or more, or exactly N)."""
    flags = predict_flags(type(task))
    args = argparse.Namespace(**{name: a.default for name, a in flags.items()})
    takes = ", ".join(flags) or "no parameters"
    for name, values in given.items():
        action = flags.get(name)
        if action is None:
            owners = [cls.title for cls in TASKS.values() if name in predict_flags(cls)]
            if owners:
                raise CliptimeError(f"{name} is for {owners[0]} models; this is a {task.title} model (takes {takes})")
            raise CliptimeError(f"unknown parameter {name!r}; a {task.title} model takes {takes}")
        if not all(isinstance(v, str) for v in values):
            raise CliptimeError(f"{name}: expected text")
        n = action.nargs
        if n is None and len(values) != 1:
            raise CliptimeError(f"{name} takes one value, got {len(values)}")
        if isinstance(n, int) and len(values) != n:
            raise CliptimeError(f"{name} takes {n} values, got {len(values)}")
        if n == "+" and not values:
            raise CliptimeError(f"{name} takes one or more values")
        setattr(args, name, values[0] if n is None else list(values))
    return args


def check_media(task: Task, media: str) -> None:
    """A file sent as image/... to an audio model (or audio/... to an image model) is refused with 415."""
    kind = media.split("/")[0]
    takes = {(mimetypes.guess_type(f"x.{s}")[0] or "").split("/")[0] for s in task.file_suffixes}
    if kind in ("image", "audio", "video") and kind not in takes:
        raise HTTPError(415, f"a {task.title} model takes {', '.join(task.file_suffixes)} files, not {media}")


async def parse(request: Request, task: Task, max_bytes: int) -> Job:
    """The Job of a POST /predict: the file as the body with query parameters, or a JSON body
    {"data": <base64>, <parameter>: value or [values]}."""
    if int(request.headers.get("content-length") or 0) > max_bytes:
        raise HTTPError(413, f"the body is larger than {max_bytes} bytes")
    body = await request.body()
    if len(body) > max_bytes:
        raise HTTPError(413, f"the body is larger than {max_bytes} bytes")
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    given: dict[str, list] = {}
    for name, value in request.query_params.multi_items():
        given.setdefault(name, []).append(value)
    data = body
    if media == "application/json":
        try:
            doc = json.loads(body)
        except ValueError:
            raise CliptimeError("the body is not valid JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), str):
            raise CliptimeError('a JSON body needs "data": the file, base64-encoded')
        try:
            data = base64.b64decode(doc.pop("data"), validate=True)
        except (binascii.Error, ValueError):
            raise CliptimeError('"data" is not valid base64') from None
        given.update({k: v if isinstance(v, list) else [v] for k, v in doc.items()})
    if not data:
        raise CliptimeError('empty body: send the file as the body, or JSON {"data": <base64 file>}')
    check_media(task, media)
    args = task_args(task, given)
    rows = task.prediction_rows(data, args)
    if len(rows) > MAX_ROWS:
        raise HTTPError(413, f"this request makes {len(rows)} model inputs; at most {MAX_ROWS}")
    return Job(rows, args)


def answer(served: Served, jobs: list[Job]) -> list[dict[str, Any] | CliptimeError]:
    """Each job's JSON answer, or the error of its input, from one `task.predict` over all their rows. A batch
    with a bad input is predicted again job by job, so that only the bad request fails."""
    rows = pd.concat([j.rows for j in jobs], ignore_index=True)
    try:  # at most MAX_ROWS model inputs at a time: a batch of T-CLAP requests may hold thousands of captions
        parts = [served.task.predict(served.model, rows.iloc[i : i + MAX_ROWS]) for i in range(0, len(rows), MAX_ROWS)]
        predictions = pd.concat(parts, ignore_index=True)
    except CliptimeError as e:
        if len(jobs) > 1:
            return [answer(served, [j])[0] for j in jobs]
        # the rows are this request's own: "input row 0" would name nothing the client sent
        return [CliptimeError(re.sub(r"^input row \d+: ", "", str(e)))]
    out: list[dict[str, Any] | CliptimeError] = []
    start = 0
    for j in jobs:
        part = predictions.iloc[start : start + len(j.rows)].reset_index(drop=True)
        out.append({**served.task.prediction_result(part, j.args), "model": served.info["source"]})
        start += len(j.rows)
    return out


def json_response(payload: Any, status: int = 200) -> Response:
    """JSON of plain and numpy values (the predictions' floats)."""
    text = json.dumps(payload, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    return Response(text, status_code=status, media_type="application/json")


def error_response(e: CliptimeError) -> Response:
    return json_response({"error": str(e)}, getattr(e, "status", 400))


# -- the page -------------------------------------------------------------------------------------------------
PAGE = """<!doctype html><html lang=en><meta charset=utf-8><title>{title} · cliptime</title>
<style>body{{font:15px system-ui,sans-serif;max-width:46em;margin:2em auto;padding:0 1em}}
#drop{{border:2px dashed #888;border-radius:8px;padding:2em;text-align:center;margin:1em 0}}
#drop.over{{background:#eef}}label{{display:block;margin:.5em 0}}input[type=text],textarea{{width:100%}}
pre{{background:#f4f4f4;padding:1em;white-space:pre-wrap}}img,audio{{max-width:100%}}</style>
<h1>{title}</h1><p>{source}</p>
<form id=flags onsubmit="return false">{fields}</form>
<div id=drop>Drop a file here ({suffixes}) or <input type=file id=file></div>
<div id=preview></div><pre id=out></pre>
<script>
const drop = document.getElementById("drop"), out = document.getElementById("out");
function query() {{
  const q = new URLSearchParams();
  for (const el of document.querySelectorAll("[data-flag]"))
    for (const v of el.value.split("\\n").map(s => s.trim()).filter(Boolean)) q.append(el.dataset.flag, v);
  return q;
}}
async function send(file) {{
  const url = URL.createObjectURL(file), kind = file.type.split("/")[0];
  document.getElementById("preview").innerHTML =
    kind === "image" ? `<img src="${{url}}">` : kind === "audio" ? `<audio controls src="${{url}}"></audio>` : "";
  out.textContent = "…";
  const r = await fetch("{predict}?" + query(),
    {{method: "POST", headers: {{"Content-Type": file.type || "application/octet-stream"}}, body: file}});
  out.textContent = r.status + "\\n" + JSON.stringify(await r.json(), null, 2);
  out.dataset.status = r.status;
}}
drop.ondragover = e => {{ e.preventDefault(); drop.classList.add("over"); }};
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = e => {{ e.preventDefault(); drop.classList.remove("over"); send(e.dataTransfer.files[0]); }};
document.getElementById("file").onchange = e => send(e.target.files[0]);
</script></html>
"""


def render_page(served: Served, predict_url: str) -> str:
    """The HTML page: a field per predict flag (a line per value of a many-valued one) and a drop zone."""
    fields = []
    for name, action in predict_flags(type(served.task)).items():
        hint = html.escape(action.help or "")
        if action.nargs is None:
            box = f'<input type=text data-flag="{name}">'
        elif isinstance(action.nargs, int):
            box = " ".join(f'<input type=text data-flag="{name}" style="width:40%">' for _ in range(action.nargs))
        else:
            box = f'<textarea rows=3 data-flag="{name}" placeholder="one per line"></textarea>'
        fields.append(f"<label>{name} <small>{hint}</small>{box}</label>")
    return PAGE.format(
        title=html.escape(f"{served.task.title} model"),
        source=html.escape(str(served.info["source"])),
        fields="".join(fields),
        suffixes=", ".join(served.task.file_suffixes),
        predict=html.escape(predict_url),
    )


# -- the deployment -------------------------------------------------------------------------------------------
# Ray Serve pickles the deployment class when it is declared: what its methods call must be defined above it.
api = FastAPI(title="cliptime", docs_url=None, redoc_url=None)


@dataclass
class Stats:
    """What one replica has answered (GET /healthz): batching shows as fewer batches than requests."""

    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    swaps: list[str] = field(default_factory=list)  # versions swapped in by --reload-alias


@serve.deployment
@serve.ingress(api)
class ModelServer:
    """One replica: the model loaded once, batched predictions, the alias re-read in the background."""

    def __init__(self, args: ServeArgs):
        self.args = args
        self.tracking = args.tracking or tracking_uri()
        # what the replica was given (a config file's `deployments` may override args): its GPU, its CPUs' threads
        self.device = "cuda" if ray.get_gpu_ids() else "cpu"
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.served = load_version(args.model, self.tracking, self.device)
        self.stats = Stats()
        self.predict_batch.set_max_batch_size(args.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(args.batch_wait_ms / 1000)
        self.reloader = None
        if args.reload_alias:  # the constructor runs on the replica's event loop
            self.reloader = asyncio.get_running_loop().create_task(self.reload_loop())

    def __del__(self) -> None:  # Serve stops a replica: no reload started from then on
        if self.reloader is not None:
            self.reloader.cancel()

    async def reload_loop(self) -> None:
        """Every `reload_alias` seconds, swap in the version the alias names now. A registry that does not answer
        or a version that cannot be loaded costs a warning; the version loaded goes on serving."""
        while True:
            await asyncio.sleep(self.args.reload_alias)
            try:
                await asyncio.to_thread(self.reload)
            except Exception as e:
                logger.warning(f"--reload-alias: kept {self.served.info['source']}: {type(e).__name__}: {e}")

    def reload(self) -> None:
        current = self.served
        if resolve(self.args.model, self.tracking)["version"] == current.info["version"]:
            return
        new = load_version(self.args.model, self.tracking, self.device)  # beside the old, which still answers
        if new.task.name != current.task.name:
            raise CliptimeError(f"{new.info['source']} is a {new.task.title} model, not {current.task.title}")
        self.served = new
        self.stats.swaps.append(str(new.info["version"]))
        logger.info(f"{self.args.model} now serves {new.info['source']} (was {current.info['source']})")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_batch(self, jobs: list[Job]) -> list[dict[str, Any] | CliptimeError]:
        served = self.served  # the whole batch on one version, even if a swap comes meanwhile
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
        return await asyncio.to_thread(answer, served, jobs)

    @api.post("/predict")
    async def predict(self, request: Request) -> Response:
        self.stats.requests += 1
        try:
            result = await self.predict_batch(await parse(request, self.served.task, self.args.max_bytes))
        except CliptimeError as e:
            return error_response(e)
        except Exception as e:  # a bug: logged with its traceback, answered as JSON, the replica serves on
            logger.exception("prediction failed")
            return json_response({"error": f"internal error ({type(e).__name__})"}, 500)
        return error_response(result) if isinstance(result, CliptimeError) else json_response(result)

    @api.get("/healthz")
    async def healthz(self) -> Response:
        return json_response({"status": "ok", "model": self.served.info["source"], **vars(self.stats)})

    @api.get("/model")
    async def model(self) -> Response:
        return json_response({**self.served.info, "reload_alias": self.args.reload_alias})

    @api.get("/")
    async def page(self, request: Request) -> HTMLResponse:
        return HTMLResponse(render_page(self.served, request.scope.get("root_path", "") + "/predict"))


# -- building and running the app -----------------------------------------------------------------------------
def settings(args: dict[str, Any]) -> ServeArgs:
    """`args` checked (a bad one named in one line), with the tracking store of this process if none is given."""
    try:
        cfg = ServeArgs.model_validate(args)
    except ValidationError as e:
        first = e.errors()[0]
        raise CliptimeError(f"serve settings: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return cfg.model_copy(update={"tracking": cfg.tracking or tracking_uri()})


def build(args: dict[str, Any]) -> Application:
    """The Serve application of `args` (ServeArgs' fields): the import path of serve/cliptime.yaml.

    Checked before anything deploys: the settings, and that the model URI names a version now (a missing model
    or alias is one line here, not a replica that fails to start). The tracking store is fixed here, where the
    app is built: a replica's environment may not be the builder's."""
    cfg = settings(args)
    if cfg.reload_alias and not re.fullmatch(ALIAS_URI, cfg.model):
        raise CliptimeError(f"--reload-alias re-reads an alias: {cfg.model} names none (use models:/NAME@ALIAS)")
    resolve(cfg.model, cfg.tracking)  # a missing model, version or alias: one line now, not failing replicas
    return ModelServer.options(
        num_replicas=cfg.replicas,
        max_ongoing_requests=2 * cfg.max_batch_size,  # one batch running, the next one filling
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    ).bind(cfg)


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def run(args: dict[str, Any], host: str, port: int) -> dict[str, Any]:
    """Serve `args` (ServeArgs' fields) on host:port until Ctrl-C or SIGTERM, then delete the app (and stop Serve
    on a Ray started here); returns the JSON line."""
    from cliptime.runtime import init_ray

    cfg = settings(args)  # the tracking store fixed before Ray starts (tracking_uri moves credentials)
    app = build(cfg.model_dump())
    ray_was_up, on_cluster = ray.is_initialized(), bool(os.environ.get("RAY_ADDRESS"))
    if not ray_was_up and not on_cluster and not port_free(host, port):
        raise CliptimeError(f"--port {port}: {host}:{port} is in use")
    init_ray()
    url = f"http://{host}:{port}/"
    served = resolve(cfg.model, cfg.tracking)
    started = time.time()
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP, route_prefix="/")
        print(f"serving {served['source']} at {url} (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        if ray_was_up or on_cluster:
            serve.delete(APP)  # others' apps on this Serve go on
        else:
            serve.shutdown()
    return {
        "model": cfg.model,
        "served": served["source"],
        "stopped": True,
        "tracking": redacted(cfg.tracking),
        "uptime_seconds": round(time.time() - started, 1),
        "url": url,
    }
