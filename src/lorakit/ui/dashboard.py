"""`lorakit dashboard`: watch, compare and talk to the runs in a directory, in a local web page.

The server is a Starlette app under uvicorn, as `lorakit serve` is; its chat is `serve`'s own app
(`serve.build_app` on a `serve.Engine`) mounted under /chat and built on the first message to a
run, so chat answers stream exactly as the OpenAI-compatible server streams them. The page is
plain HTML, CSS and JavaScript shipped in assets/dashboard (its line charts are drawn as SVG by
chart.js there): nothing is fetched from the network.

Endpoints (JSON; run ids are paths relative to --runs_dir, passed as ?id=):
  GET  /api/runs                   every run with its status and numbers (rundir.summarize)
  GET  /api/run?id=                one run: all settings, eval reports with failures, data check
  GET  /api/metrics?id=&offset=    metrics.jsonl rows from a byte offset (the page polls it)
  GET  /api/compare?id=&id=...     the runs, the settings that differ, their eval reports
  GET  /api/form                   the fields of `lorakit train` (and of the planner) for the form
  POST /api/plan, /api/train       the planner's answer for a form; start `lorakit train`
  GET  /api/jobs/{n}?offset=       a started training's output; POST /api/jobs/{n}/stop
  POST /chat/v1/chat/completions?run=ID   serve's route on the run's adapter ("adapter") or its base ("base")
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
import typing
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from ..core.config import DashboardConfig, PlanConfig, ServeConfig, TrainConfig
from ..core.errors import LorakitError
from ..core.fields import form_value, resolve
from ..core.runfiles import ADAPTER_CONFIG, METRICS, TRAIN_LOG
from ..inference.access import LOCAL, Access, access_for, check_bind, configured_key, guarded
from . import rundir

ASSETS = ("index.html", "app.js", "chart.js", "app.css")
MEDIA = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
# Training fields the form does not offer: they make no sense for a run started from the page.
FORM_HIDDEN = {"resume_from_checkpoint", "num_processes", "distributed"}
# ... and those it refuses: running a model's own Python code is for the terminal, where the user
# types it, never for a request that any page could have sent (nor reading another run's folder,
# nor starting launchers).
FORM_REFUSED = {"trust_remote_code"} | FORM_HIDDEN
# Where a run started from the page may report: files in its own folder, nothing on the network.
FORM_REPORT_TO = {"tensorboard", "none"}
PLAN_FIELDS = ("gpu", "gpu_memory", "num_gpus", "utilization")
MAX_ENGINES = 2  # chat models kept loaded (one per run talked to); the oldest is closed beyond that


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------------
# Training runs started from the page


@dataclass
class TrainingJob:
    number: int
    output_dir: Path
    log: Path
    command: list[str]
    process: subprocess.Popen

    def to_json(self, root: Path, offset: int = 0) -> dict:
        code = self.process.poll()
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                text = f.read(1 << 20)
        except OSError:
            text = b""
        try:
            run_id = self.output_dir.resolve().relative_to(root).as_posix()
        except ValueError:
            run_id = None
        return {
            "number": self.number,
            "output_dir": str(self.output_dir),
            "run": run_id,
            "command": shlex.join(["lorakit", *self.command[3:]]),
            "running": code is None,
            "returncode": code,
            "output": text.decode("utf-8", errors="replace"),
            "offset": offset + len(text),
        }


class Jobs:
    """`lorakit train` processes started from the page; each writes its output to OUT/train.log."""

    def __init__(self):
        self.jobs: list[TrainingJob] = []

    def start(self, cfg: TrainConfig) -> TrainingJob:
        from ..planning.plan import train_args

        out = Path(cfg.output_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        log = out / TRAIN_LOG
        command = [sys.executable, "-m", "lorakit", "train", *train_args(cfg)]
        if "--output_dir" not in command:  # the default output_dir: pass it all the same
            command += ["--output_dir", str(out)]
        with open(log, "wb") as f:
            process = subprocess.Popen(
                command,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # the run goes on if the dashboard stops
            )
        job = TrainingJob(len(self.jobs) + 1, out, log, command, process)
        self.jobs.append(job)
        return job

    def get(self, number: int) -> TrainingJob:
        if not 1 <= number <= len(self.jobs):
            raise BadRequest(f"no job {number}", 404)
        return self.jobs[number - 1]

    def alive_dirs(self) -> set[Path]:
        return {j.output_dir.resolve() for j in self.jobs if j.process.poll() is None}


# ------------------------------------------------------------------------------------------------
# Chat: serve's app on an engine per run, loaded on the first message


class ChatEngines:
    def __init__(self, cfg: DashboardConfig):
        self.cfg = cfg
        self.loaded: dict[Path, tuple[Any, Any]] = {}  # run dir -> (engine, app), oldest first
        self.lock = asyncio.Lock()

    def serve_config(self, run: Path) -> ServeConfig:
        settings, _ = rundir.settings_of(run)
        has_adapter = (run / ADAPTER_CONFIG).is_file()
        return ServeConfig(
            base_model="" if has_adapter else str(settings.get("base_model") or ""),
            adapter=[f"adapter={run}"] if has_adapter else [],
            threads=self.cfg.threads,
        )

    async def app_for(self, run: Path):
        from ..inference.serve import Engine, build_app

        async with self.lock:
            if run in self.loaded:
                self.loaded[run] = self.loaded.pop(run)  # most recently used last
                return self.loaded[run][1]
            engine = await asyncio.to_thread(Engine, self.serve_config(run))
            self.loaded[run] = (engine, build_app(engine, access=None))  # behind the dashboard's
            while len(self.loaded) > MAX_ENGINES:
                old = next(iter(self.loaded))
                self.loaded.pop(old)[0].close()
            return self.loaded[run][1]

    def close(self) -> None:
        for engine, _ in self.loaded.values():
            engine.close()
        self.loaded.clear()


# ------------------------------------------------------------------------------------------------
# Form values -> configs


def form_fields() -> list[dict]:
    """The train fields, then the planner's own, as the page draws them (from the dataclasses)."""
    fields = []
    for cls, names in (
        (
            TrainConfig,
            [f.name for f in dataclasses.fields(TrainConfig) if f.name not in FORM_HIDDEN | FORM_REFUSED],
        ),
        (PlanConfig, list(PLAN_FIELDS)),
    ):
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for name in names:
            f = by_name[name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            kind = hints[name]
            kind_name = (
                "list"
                if typing.get_origin(kind) is list
                else "bool"
                if kind is bool
                else "int"
                if kind is int
                else "float"
                if kind is float
                else "str"
            )
            fields.append(
                {
                    "name": name,
                    "type": kind_name,
                    "default": default,
                    "help": f.metadata["help"],
                    "choices": f.metadata.get("choices"),
                    "plan": cls is PlanConfig,
                }
            )
    return fields


def configs_from_form(values: dict, root: Path) -> tuple[TrainConfig, PlanConfig]:
    """The form's values (strings, booleans, lists) checked as the flags would be; the run is
    written inside the runs directory `root` (a relative output_dir is taken from there)."""
    if not isinstance(values, dict):
        raise BadRequest("the form must be a JSON object")
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    flags: dict[str, Any] = {}
    try:
        for name, value in values.items():
            if name in FORM_REFUSED:
                raise BadRequest(
                    f"{name} cannot be set from the dashboard: run `lorakit train --{name}` yourself"
                )
            if name not in train_names and name not in PLAN_FIELDS:
                raise BadRequest(f"unknown field {name!r}")
            if value is None or value == "" and name in PLAN_FIELDS:
                continue
            flags[name] = form_value(PlanConfig, name, value)
        plan_cfg = resolve(PlanConfig, flags)
    except LorakitError as e:
        raise BadRequest(str(e)) from None
    for name, value in dataclasses.asdict(plan_cfg).items():  # a list item is an argument of its own
        if isinstance(value, list) and any(str(v).startswith("-") for v in value):
            raise BadRequest(f"{name}: an item cannot start with '-'")
    if not set(plan_cfg.report_to) <= FORM_REPORT_TO:
        raise BadRequest(f"report_to: a run started here reports to {' or '.join(sorted(FORM_REPORT_TO))}")
    out = (root / Path(plan_cfg.output_dir).expanduser()).resolve()
    if not out.is_relative_to(root) or out == root:
        raise BadRequest(f"output_dir {plan_cfg.output_dir}: a run started here is written inside {root}")
    plan_cfg = replace(plan_cfg, output_dir=str(out))
    train_cfg = TrainConfig(**{k: v for k, v in dataclasses.asdict(plan_cfg).items() if k in train_names})
    return train_cfg, plan_cfg


def plan_answer(plan_cfg: PlanConfig, train_cfg: TrainConfig) -> dict:
    from ..planning.memory import GIB, make_plan
    from ..planning.plan import train_command_line

    p = make_plan(plan_cfg)
    return {
        "model": p.model,
        "fits": p.fits,
        "gpu": p.gpu,
        "total_gib": round(p.total_bytes / GIB, 2),
        "budget_gib": round(p.budget_bytes / GIB, 2) if p.budget_bytes else None,
        "memory": [
            {"what": label, "gib": round(b / GIB, 3), "part": part} for label, b, part in p.memory.rows()
        ],
        "trainable": p.trainable,
        "total": p.total,
        "precision": p.precision,
        "batch": f"{p.batch_size} x {p.seq_len} tokens ({p.seq_len_source})",
        "tokens_per_second": round(p.tokens_per_second) if p.tokens_per_second else None,
        "epoch_minutes": round(p.epoch_seconds / 60, 1) if p.epoch_seconds else None,
        "command": train_command_line(train_cfg),
    }


# ------------------------------------------------------------------------------------------------
# The app


class Dashboard:
    """What the routes share: the runs directory, the started jobs and the chat engines."""

    def __init__(self, cfg: DashboardConfig):
        self.cfg = cfg
        self.root = Path(cfg.runs_dir).expanduser().resolve()
        self.jobs = Jobs()
        self.chat = ChatEngines(cfg)

    def run_dir(self, run_id: str | None) -> Path:
        if not run_id:
            raise BadRequest("give the run as ?id=PATH (relative to the runs directory)")
        path = (self.root / run_id).resolve()
        if not path.is_relative_to(self.root) or not path.is_dir():
            raise BadRequest(f"no run {run_id!r} in {self.root}", 404)
        return path

    def summary(self, path: Path) -> dict:
        alive = path in self.jobs.alive_dirs()
        return rundir.summarize(path, self.root, self.cfg.stale_after, alive).to_json()

    def runs(self) -> dict:
        paths = rundir.find_runs(self.root) if self.root.is_dir() else []
        alive = self.jobs.alive_dirs()
        runs = [rundir.summarize(p, self.root, self.cfg.stale_after, p in alive).to_json() for p in paths]
        return {"root": str(self.root), "runs": runs, "jobs": len(self.jobs.jobs)}

    def detail(self, path: Path) -> dict:
        settings, notes = rundir.settings_of(path)
        checkpoints = sorted(
            (d.name for d in path.glob("checkpoint-*") if d.is_dir()),
            key=lambda n: int(n.rsplit("-", 1)[-1]) if n.rsplit("-", 1)[-1].isdigit() else -1,
        )
        return {
            "summary": self.summary(path),
            "settings": settings,
            "settings_notes": notes,
            "evals": rundir.eval_reports(path),
            "data_check": rundir.data_check(path),
            "sweep": rundir.sweep_of(path, self.root),
            "checkpoints": checkpoints,
        }

    def compare(self, ids: list[str]) -> dict:
        if len(ids) < 2:
            raise BadRequest("pick at least two runs to compare")
        paths = [self.run_dir(i) for i in ids]
        settings = [rundir.settings_of(p)[0] for p in paths]
        return {
            "runs": [self.summary(p) for p in paths],
            "diff": rundir.config_diff(settings),
            "evals": [rundir.eval_reports(p) for p in paths],
        }


def _chat_mount(board: Dashboard):
    """/chat/v1/...?run=ID: serve's app on that run's engine, the path given without /chat."""
    from urllib.parse import parse_qs

    async def app(scope, receive, send):
        from starlette.responses import JSONResponse

        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            path = board.run_dir((query.get("run") or [""])[0])
            served = await board.chat.app_for(path)
        except BadRequest as e:
            return await JSONResponse({"error": {"message": str(e)}}, e.status)(scope, receive, send)
        except LorakitError as e:
            return await JSONResponse({"error": {"message": f"cannot load this run for chat: {e}"}}, 400)(
                scope, receive, send
            )
        inner = scope["path"].removeprefix("/chat")
        await served({**scope, "path": inner, "raw_path": inner.encode(), "root_path": ""}, receive, send)

    return app


def build_dashboard_app(board: Dashboard, access: Access | None = None):
    """The page and its API behind `access` (lorakit.access): the page itself (static files, no
    data) needs no key; the API and the chat need the key or the per-launch token, which the page
    takes from the URL it was opened with (or asks for) and sends."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Mount, Route

    def asset(name: str) -> Response:
        if name not in ASSETS:
            return Response("not found", 404)
        data = (resources.files("lorakit") / "assets" / "dashboard" / name).read_bytes()
        media = MEDIA[Path(name).suffix] + "; charset=utf-8"
        return Response(data, media_type=media, headers={"Cache-Control": "no-cache"})

    async def index(request: Request):
        return asset("index.html")

    async def static(request: Request):
        return asset(request.path_params["name"])

    async def runs(request: Request):
        return JSONResponse(await asyncio.to_thread(board.runs))

    async def run(request: Request):
        return JSONResponse(board.detail(board.run_dir(request.query_params.get("id"))))

    async def metrics(request: Request):
        path = board.run_dir(request.query_params.get("id"))
        offset = request.query_params.get("offset", "0")
        m = rundir.read_metrics(path / METRICS, int(offset) if offset.isdigit() else 0)
        return JSONResponse({"rows": m.rows, "offset": m.offset, "notes": m.notes})

    async def compare(request: Request):
        return JSONResponse(board.compare(request.query_params.getlist("id")))

    async def form(request: Request):
        stamp = time.strftime("run-%Y%m%d-%H%M%S")
        return JSONResponse({"fields": form_fields(), "output_dir": str(board.root / stamp)})

    async def read_form(request: Request) -> tuple[TrainConfig, PlanConfig]:
        try:
            values = json.loads(await request.body())
        except ValueError as e:
            raise BadRequest(f"the request body is not valid JSON ({e})") from None
        return configs_from_form(values, board.root)

    async def plan(request: Request):
        train_cfg, plan_cfg = await read_form(request)
        try:
            return JSONResponse(await asyncio.to_thread(plan_answer, plan_cfg, train_cfg))
        except LorakitError as e:
            raise BadRequest(str(e)) from None

    async def train(request: Request):
        train_cfg, _ = await read_form(request)
        return JSONResponse(board.jobs.start(train_cfg).to_json(board.root))

    async def job(request: Request):
        j = board.jobs.get(int(request.path_params["number"]))
        offset = request.query_params.get("offset", "0")
        return JSONResponse(j.to_json(board.root, int(offset) if offset.isdigit() else 0))

    async def stop(request: Request):
        j = board.jobs.get(int(request.path_params["number"]))
        if j.process.poll() is None:  # train saves a checkpoint after this step, then stops
            os.killpg(j.process.pid, signal.SIGINT)
        return JSONResponse(j.to_json(board.root))

    async def on_bad_request(request: Request, e: BadRequest):
        return JSONResponse({"error": str(e)}, e.status)

    routes = [
        Route("/", index),
        Route("/assets/{name}", static),
        Route("/api/runs", runs),
        Route("/api/run", run),
        Route("/api/metrics", metrics),
        Route("/api/compare", compare),
        Route("/api/form", form),
        Route("/api/plan", plan, methods=["POST"]),
        Route("/api/train", train, methods=["POST"]),
        Route("/api/jobs/{number:int}", job),
        Route("/api/jobs/{number:int}/stop", stop, methods=["POST"]),
        Mount("/chat", app=_chat_mount(board)),
    ]
    app = Starlette(routes=routes, exception_handlers={BadRequest: on_bad_request})
    return guarded(app, replace(access or LOCAL, public=("/", "/assets/*")))


def dashboard(cfg: DashboardConfig, ready: threading.Event | None = None) -> None:

    root = Path(cfg.runs_dir).expanduser()
    if not root.is_dir():
        raise LorakitError(f"--runs_dir {cfg.runs_dir}: no such directory (train a run into it first)")
    given = configured_key(cfg)
    # No key given: a per-launch token, in the URL printed below (as Jupyter does).
    api_key = given or ("" if cfg.insecure_no_key else secrets.token_urlsafe(24))
    check_bind(cfg.host, api_key, cfg.insecure_no_key)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as serve: chat decodes on a shared CPU
    from ..inference.serve import listen, run_app, url_host

    board = Dashboard(cfg)
    sock = listen(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    what = f"dashboard of {board.root}: open http://{url_host(host)}:{port}/"
    if given:
        what += " (API key required)"
    elif api_key:
        what += f"?token={api_key}"
    else:
        what += " (no token: --insecure_no_key)"
    app = build_dashboard_app(board, access_for(cfg, api_key))
    run_app(app, sock, what, bool(api_key), ready, board.chat.close)
