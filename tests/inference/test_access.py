"""Who may talk to `lorakit serve` and `lorakit dashboard`: Host, Origin, JSON bodies, key.

The rules on a small app (Starlette's TestClient, no network), then the real commands as a
hostile page would reach them (curl's view: urllib with forged Origin and Host headers), then
Chromium: a page on another origin that fetches from both servers, and the dashboard opened at
the URL it prints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lorakit.core.errors import LorakitError
from lorakit.inference.access import Access, check_bind, guarded, is_loopback

from ..conftest import assemble_rows, css, serve_in_thread, wait, write_jsonl

EVIL = "http://evil.example"


# ------------------------------------------------------------------------------------------------
# The rules


@pytest.fixture
def client_for():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    calls = []

    async def echo(request):
        calls.append(request.method)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/health", echo), Route("/api/x", echo, methods=["GET", "POST"])])

    def make(access: Access, base="http://127.0.0.1:8000"):
        return TestClient(guarded(app, access), base_url=base), calls

    return make


def test_hosts_that_name_the_bound_address_only(client_for):
    c, calls = client_for(Access())
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "localhost"):
        assert c.get("/api/x", headers={"host": host}).status_code == 200, host
    for host in ("rebind.example", "rebind.example:8000", "127.0.0.1.evil.example", "10.0.0.2:8000"):
        assert c.get("/api/x", headers={"host": host}).status_code == 400, host
    c, _ = client_for(Access(host="10.0.0.2", key="k"))
    assert c.get("/api/x", headers={"host": "10.0.0.2:8000", "authorization": "Bearer k"}).status_code == 200
    assert c.get("/api/x", headers={"host": "rebind.example"}).status_code == 400
    c, _ = client_for(Access(host="0.0.0.0", key="k"))  # all interfaces: any name, the key decides
    assert c.get("/api/x", headers={"host": "box.lan:8000", "authorization": "Bearer k"}).status_code == 200
    assert calls == ["GET"] * 6


def test_cross_origin_requests_are_refused_unless_allowed(client_for):
    c, calls = client_for(Access())
    same = c.post("/api/x", json={}, headers={"origin": "http://127.0.0.1:8000"})
    assert same.status_code == 200
    for origin in (EVIL, "http://127.0.0.1:9999", "null", "http://localhost:8000"):
        r = c.post("/api/x", content=b"{}", headers={"origin": origin, "content-type": "text/plain"})
        assert r.status_code == 403, origin
        assert "--allowed_origins" in r.json()["error"]["message"]
    assert c.get("/api/x", headers={"origin": EVIL}).status_code == 403  # reads too (rebinding aside)
    assert calls == ["POST"]
    c, calls = client_for(Access(origins=("http://app.example:3000", "https://*.corp.example")))
    ok = c.get("/api/x", headers={"origin": "http://app.example:3000"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example:3000"
    assert c.get("/api/x", headers={"origin": "https://a.corp.example"}).status_code == 200
    assert c.get("/api/x", headers={"origin": "http://app.example:3001"}).status_code == 403
    preflight = c.options(
        "/api/x",
        headers={
            "origin": "http://app.example:3000",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200 and "POST" in preflight.headers["access-control-allow-methods"]
    refused = c.options(
        "/api/x", headers={"origin": EVIL, "access-control-request-method": "POST"}
    ).headers.get("access-control-allow-origin")
    assert refused is None


def test_state_changing_requests_must_be_json(client_for):
    c, calls = client_for(Access())
    for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": media} if media else {}
        r = c.post("/api/x", content=b'{"a": 1}', headers=headers)
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], media
    assert c.post(
        "/api/x", content=b"{}", headers={"content-type": "application/json; charset=utf-8"}
    ).is_success
    assert calls == ["POST"]


def test_the_key_guards_all_but_public_paths(client_for):
    c, calls = client_for(Access(key="s3cret", public=("/health",)))
    assert c.get("/health").status_code == 200
    assert c.get("/api/x").status_code == 401
    assert (
        c.get("/api/x", headers={"authorization": "Bearer wrong"}).json()["error"]["code"]
        == "invalid_api_key"
    )
    assert c.get("/api/x", headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert calls == ["GET", "GET"]
    page = Access(key="s3cret", public=("/", "/assets/*"))  # the dashboard's: the page, not the API
    assert page.is_public("/") and page.is_public("/assets/app.js")
    assert not page.is_public("/api/runs") and not page.is_public("/chat/v1/models")


def test_no_websocket_and_no_preflight_without_the_key(client_for):
    from starlette.websockets import WebSocketDisconnect

    c, calls = client_for(Access(key="s3cret"))
    with pytest.raises(WebSocketDisconnect):
        with c.websocket_connect("/api/x", headers={"authorization": "Bearer s3cret"}):
            pass
    assert c.options("/api/x").status_code == 401
    c, _ = client_for(Access(origins=("http://[::1]:3000",)))
    assert c.get("/api/x", headers={"origin": "http://[::1]:3000"}).status_code == 200
    assert c.get("/api/x", headers={"origin": "http://:1:3000"}).status_code == 403
    assert calls == ["GET"]


def test_the_form_cannot_smuggle_flags_nor_report_elsewhere(tmp_path):
    from lorakit.cli import _parser
    from lorakit.planning.plan import train_args
    from lorakit.ui.dashboard import BadRequest, configs_from_form

    root = tmp_path.resolve()
    base = {"base_model": "m", "dataset": "d.jsonl", "output_dir": "run"}
    smuggled = {"target_modules": "q_proj --trust_remote_code --output_dir /tmp/evil"}
    for extra, why in (
        (smuggled, "cannot start with '-'"),
        ({"report_to": "wandb"}, "report_to"),
        ({"resume_from_checkpoint": "/elsewhere/checkpoint-4"}, "cannot be set"),
        ({"distributed": "fsdp"}, "cannot be set"),
    ):
        with pytest.raises(BadRequest, match=why):
            configs_from_form({**base, **extra}, root)
    cfg, _ = configs_from_form(
        {**base, "target_modules": "q_proj v_proj", "system_prompt": "Say 'hi' --x"}, root
    )
    assert cfg.output_dir == str(root / "run")
    parsed = vars(_parser().parse_args(["train", *train_args(cfg)]))  # what the started process reads
    assert parsed["target_modules"] == ["q_proj", "v_proj"] and parsed["system_prompt"] == "Say 'hi' --x"
    assert parsed.get("trust_remote_code") in (None, False) and parsed["output_dir"] == str(root / "run")


def test_a_non_loopback_bind_needs_a_key():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("box.lan")
    check_bind("127.0.0.1", "", False)
    check_bind("0.0.0.0", "key", False)
    check_bind("0.0.0.0", "", True)
    with pytest.raises(LorakitError, match="--insecure_no_key"):
        check_bind("0.0.0.0", "", False)


def test_serve_refuses_a_non_loopback_host_without_a_key(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lorakit", "serve", "--host", "0.0.0.0", "--base_model", str(tmp_path)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "LORAKIT_API_KEY"},
    )
    assert done.returncode != 0
    assert "without a key" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------
# The real commands, as a hostile page would reach them


def request(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"text": body.decode()}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, tiny_llama) -> Path:
    from lorakit.training.train import train

    from ..conftest import tiny_train_config

    root = tmp_path_factory.mktemp("access-runs")
    data = write_jsonl(root.parent / "access-data.jsonl", assemble_rows(8))
    train(tiny_train_config(tiny_llama, data, root / "tuned"))
    return root


@pytest.fixture(scope="module")
def dashboard_process(runs_dir):
    """`lorakit dashboard` as a user starts it: (printed URL, token, process)."""
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "dashboard", "--runs_dir", str(runs_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    end = time.time() + 120
    line = ""
    while time.time() < end and "open http" not in line:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "the dashboard exited"
    url = line.split("open ", 1)[1].split()[0]
    yield url, url.split("?token=", 1)[1], proc
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def test_the_dashboard_prints_a_tokened_url_and_wants_the_token(dashboard_process):
    url, token, _ = dashboard_process
    site = url.split("?")[0].rstrip("/")
    assert url.startswith("http://127.0.0.1:") and len(token) >= 24
    assert request(site + "/api/runs")[0] == 401
    status, listing = request(site + "/api/runs", headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and [r["id"] for r in listing["runs"]] == ["tuned"]
    with urllib.request.urlopen(site + "/", timeout=10) as r:  # the page itself holds no data
        assert r.status == 200


def test_a_hostile_page_cannot_start_a_run_nor_read_through_rebinding(
    dashboard_process, runs_dir, tiny_llama
):
    url, token, _ = dashboard_process
    site = url.split("?")[0].rstrip("/")
    auth = {"Authorization": f"Bearer {token}"}
    form = json.dumps(
        {
            "base_model": str(tiny_llama),
            "dataset": str(runs_dir.parent / "access-data.jsonl"),
            "output_dir": str(runs_dir / "evil"),
            "trust_remote_code": True,
            "max_steps": "1",
        }
    ).encode()
    for path in ("/api/train", "/api/plan"):
        # a "simple" cross-origin request: no preflight, so the server must refuse it itself
        status, _ = request(site + path, form, {"Origin": EVIL, "Content-Type": "text/plain"})
        assert status == 403, path
        status, _ = request(site + path, form, {"Content-Type": "text/plain", **auth})  # no Origin header
        assert status == 415, path
    assert request(site + "/api/runs", headers={"Host": "rebind.example", **auth})[0] == 400
    assert request(site + "/api/runs", headers={"Host": "rebind.example:80"})[0] == 400
    # Same origin with the token: the form still cannot run remote code nor write elsewhere.
    json_auth = {"Content-Type": "application/json", **auth}
    status, body = request(site + "/api/train", form, json_auth)
    assert status == 400 and "trust_remote_code cannot be set" in body["error"]
    outside = json.loads(form)
    outside.pop("trust_remote_code")
    for where in (str(runs_dir.parent / "elsewhere"), "../elsewhere", str(runs_dir)):
        status, body = request(
            site + "/api/train", json.dumps({**outside, "output_dir": where}).encode(), json_auth
        )
        assert status == 400 and "inside" in body["error"], where
    status, listing = request(site + "/api/runs", headers=auth)
    assert listing["jobs"] == 0 and not (runs_dir / "evil").exists()
    assert not (runs_dir.parent / "elsewhere").exists()


# ------------------------------------------------------------------------------------------------
# serve


@pytest.fixture(scope="module")
def served(tiny_llama):
    """serve's app without a key on the tiny base, under uvicorn in a thread, recording what
    reached the engine: (url, generated requests)."""
    from lorakit.core.config import ServeConfig
    from lorakit.inference.serve import Engine, build_app

    engine = Engine(ServeConfig(base_model=str(tiny_llama), max_tokens_limit=8, system_prompt=""))
    app = build_app(engine)
    reached = []

    async def recording(scope, receive, send):
        async def sent(message):
            if message["type"] == "http.response.start":
                reached.append((scope.get("path"), message["status"]))
            await send(message)

        await app(scope, receive, sent)

    url, stop = serve_in_thread(recording)
    yield url, reached
    stop()
    engine.close()


def test_serve_refuses_cross_origin_and_rebinding_and_the_openai_client_still_works(served):
    import openai

    url, reached = served
    body = json.dumps({"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    status, err = request(
        url + "/v1/chat/completions", body.encode(), {"Origin": EVIL, "Content-Type": "text/plain"}
    )
    assert status == 403 and err["error"]["code"] == "origin_not_allowed"
    assert request(url + "/v1/chat/completions", body.encode(), {"Content-Type": "text/plain"})[0] == 415
    assert request(url + "/v1/models", headers={"Host": "rebind.example"})[0] == 400
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    answer = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert answer.choices[0].message.content is not None


# ------------------------------------------------------------------------------------------------
# In a real browser


class _Page(BaseHTTPRequestHandler):
    html = b""

    def do_GET(self):  # noqa: N802 (the standard library's name)
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.end_headers()
        self.wfile.write(self.html)

    def log_message(self, *args):
        pass


ATTACK = """<!doctype html><title>another site</title><pre id="out"></pre><script>
const results = {};
async function attempt(name, url, init) {
  try { const r = await fetch(url, init); results[name] = r.type === "opaque" ? "opaque" : "status " + r.status; }
  catch (e) { results[name] = "refused"; }
}
(async () => {
  const form = JSON.stringify(FORM);
  const chat = JSON.stringify({model: "base", messages: [{role: "user", content: "hi"}], max_tokens: 2});
  await attempt("train-simple", DASH + "/api/train", {method: "POST", mode: "no-cors", body: form,
    headers: {"Content-Type": "text/plain"}});
  await attempt("plan-simple", DASH + "/api/plan", {method: "POST", mode: "no-cors", body: form,
    headers: {"Content-Type": "text/plain"}});
  await attempt("train-json", DASH + "/api/train", {method: "POST", body: form,
    headers: {"Content-Type": "application/json"}});
  await attempt("runs-read", DASH + "/api/runs", {});
  await attempt("chat-simple", SERVE + "/v1/chat/completions", {method: "POST", mode: "no-cors", body: chat,
    headers: {"Content-Type": "text/plain"}});
  await attempt("chat-json", SERVE + "/v1/chat/completions", {method: "POST", body: chat,
    headers: {"Content-Type": "application/json"}});
  await attempt("models-read", SERVE + "/v1/models", {});
  document.getElementById("out").textContent = JSON.stringify(results);
})();
</script>"""


def test_browser_a_page_on_another_origin_is_refused_by_both_servers(
    browser, dashboard_process, served, runs_dir, tiny_llama
):
    url, token, _ = dashboard_process
    site = url.split("?")[0].rstrip("/")
    serve_url, reached = served
    before = len(reached)
    form = {"base_model": str(tiny_llama), "dataset": "x.jsonl", "output_dir": str(runs_dir / "evil")}
    _Page.html = (
        ATTACK.replace("FORM", json.dumps(form))
        .replace("DASH", json.dumps(site))
        .replace("SERVE", json.dumps(serve_url))
        .encode()
    )
    page = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=page.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{page.server_address[1]}/")  # another port: another origin
        wait(browser, 30, lambda d: css(d, "#out")[0].text.startswith("{"), "the page did not finish")
        results = json.loads(css(browser, "#out")[0].text)
    finally:
        page.shutdown()
    # Simple requests go out (opaque to the page); preflighted ones and reads fail in the browser.
    assert results == {
        "train-simple": "opaque",
        "plan-simple": "opaque",
        "train-json": "refused",
        "runs-read": "refused",
        "chat-simple": "opaque",
        "chat-json": "refused",
        "models-read": "refused",
    }, results
    # ... and on the servers: every one refused, nothing generated, no run started.
    statuses = {path: status for path, status in reached[before:]}
    assert statuses and all(s == 403 for s in statuses.values()), reached[before:]
    auth = {"Authorization": f"Bearer {token}"}
    assert request(site + "/api/runs", headers=auth)[1]["jobs"] == 0 and not (runs_dir / "evil").exists()


def test_browser_the_printed_url_opens_the_dashboard(browser, dashboard_process):
    url, token, _ = dashboard_process
    browser.get(url)
    wait(browser, 30, lambda d: css(d, 'tr[data-run="tuned"][data-status="finished"]'), "no runs listed")
    assert "token" not in browser.current_url  # taken out of the address bar and the history
    assert browser.execute_script("return sessionStorage.getItem('lorakit-key')") == token
    assert not css(browser, "p.error") and css(browser, "#keybar")[0].get_attribute("hidden") is not None
