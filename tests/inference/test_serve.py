"""`lorakit serve` on a tiny model, driven with the official openai client."""

import concurrent.futures
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from lorakit.core.config import TrainConfig
from lorakit.training.train import train

from ..conftest import serve_in_thread, write_jsonl

openai = pytest.importorskip("openai")
KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_process(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("serve")
    data = write_jsonl(
        tmp / "d.jsonl", [{"instruction": f"q{i}", "output": f"answer {i}"} for i in range(16)]
    )
    adapters = []
    for name, lr in (("alpha", 5e-2), ("beta", 1e-1)):
        out = train(
            TrainConfig(
                base_model=str(tiny_llama),
                dataset=str(data),
                output_dir=str(tmp / name),
                max_steps=6,
                lora_r=8,
                learning_rate=lr,
                batch_size=8,
                gradient_accumulation_steps=1,
                warmup_steps=0,
                seed=1 if name == "alpha" else 2,
                system_prompt="",
            )
        )
        adapters.append(f"{name}={out}")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorakit",
            "serve",
            "--adapter",
            *adapters,
            "--port",
            str(port),
            "--max_tokens_limit",
            "64",
            "--max_request_bytes",
            "20000",
            "--max_concurrent_requests",
            "4",
            "--max_queued_requests",
            "8",
        ],
        env={**os.environ, "LORAKIT_API_KEY": KEY},  # the key from the environment, not the command line
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            req = urllib.request.Request(base_url + "/models", headers={"Authorization": f"Bearer {KEY}"})
            urllib.request.urlopen(req, timeout=1)
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read()) from None
            time.sleep(0.1)
    yield base_url, proc
    proc.terminate()
    proc.wait(10)


def client(base_url, key=KEY):
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)


def raw_post(base_url, path, data: bytes, key=KEY):
    req = urllib.request.Request(
        base_url + path,
        data=data,
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


MESSAGES = [{"role": "user", "content": "q3"}]


def test_models_chat_stream_and_adapters(serve_process):
    base_url, _ = serve_process
    c = client(base_url)
    assert sorted(m.id for m in c.models.list().data) == ["alpha", "base", "beta"]
    full = c.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason in ("stop", "length") and full.usage.completion_tokens >= 1
    chunks = list(
        c.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=12, temperature=0, stream=True)
    )
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    outputs = {
        m: c.chat.completions.create(model=m, messages=MESSAGES, max_tokens=12, temperature=0)
        .choices[0]
        .message.content
        for m in ("alpha", "beta", "base")
    }
    assert len(set(outputs.values())) == 3, outputs  # each adapter (and none) answers differently
    assert outputs["alpha"] == text  # switching adapters back and forth is stable
    comp = c.completions.create(model="beta", prompt="Hello", max_tokens=5, temperature=0)
    assert comp.object == "text_completion" and isinstance(comp.choices[0].text, str)


def test_errors_and_the_server_keeps_serving(serve_process):
    base_url, proc = serve_process
    with pytest.raises(openai.AuthenticationError):
        client(base_url, key="wrong").models.list()
    status, body = raw_post(base_url, "/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = raw_post(
        base_url, "/chat/completions", json.dumps({"model": "alpha", "messages": "hi"}).encode()
    )
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = raw_post(
        base_url,
        "/chat/completions",
        json.dumps({"model": "alpha", "messages": MESSAGES, "max_tokens": 10_000}).encode(),
    )
    assert status == 400 and "limit" in body["error"]["message"]
    status, body = raw_post(
        base_url, "/chat/completions", json.dumps({"model": "nope", "messages": MESSAGES}).encode()
    )
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = raw_post(base_url, "/chat/completions", b"{" + b" " * 30_000 + b"}")
    assert status == 413
    with pytest.raises(openai.BadRequestError):
        client(base_url).chat.completions.create(model="alpha", messages=[{"role": "robot", "content": "x"}])
    # Still answering after all of that.
    assert len(client(base_url).models.list().data) == 3
    assert proc.poll() is None


def health(base_url) -> dict:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=10) as r:
        return json.loads(r.read())


def test_concurrent_requests_get_the_answers_they_get_alone(serve_process):
    base_url, _ = serve_process
    asks = [(m, f"q{k}") for k, m in enumerate(["alpha", "beta", "base"] * 3)][:8]

    def ask(model_and_prompt):
        model, prompt = model_and_prompt
        r = client(base_url).chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0
        )
        return r.choices[0].message.content, r.usage.completion_tokens

    alone = [ask(a) for a in asks]
    steps = health(base_url)["decode_steps"]
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(ask, asks))
    assert together == alone
    assert health(base_url)["decode_steps"] - steps < sum(n for _, n in alone) - len(asks)  # shared steps


def test_openai_features(serve_process):
    base_url, _ = serve_process
    c = client(base_url)
    assert c.models.retrieve("beta").id == "beta"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")
    chunks = list(
        c.chat.completions.create(
            model="alpha",
            messages=MESSAGES,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(ch.usage is None for ch in chunks[:-1])
    three = c.chat.completions.create(
        model="beta", messages=MESSAGES, max_tokens=8, n=3, temperature=1.0, seed=5
    )
    assert [ch.index for ch in three.choices] == [0, 1, 2]
    again = c.chat.completions.create(
        model="beta", messages=MESSAGES, max_tokens=8, n=3, temperature=1.0, seed=5
    )
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in three.choices]
    streamed = list(
        c.chat.completions.create(
            model="beta", messages=MESSAGES, max_tokens=4, n=2, temperature=0, stream=True
        )
    )
    assert {ch.choices[0].index for ch in streamed} == {0, 1}
    as_developer = c.chat.completions.create(
        model="alpha",
        messages=[{"role": "developer", "content": "Be brief."}, *MESSAGES],
        max_tokens=8,
        temperature=0,
    )
    as_system = c.chat.completions.create(
        model="alpha",
        messages=[{"role": "system", "content": "Be brief."}, *MESSAGES],
        max_tokens=8,
        temperature=0,
    )
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    refused = {
        "tools": dict(tools=[tool]),
        "response_format": dict(response_format={"type": "json_object"}),
        "logprobs": dict(logprobs=True),
    }
    for key, extra in refused.items():
        with pytest.raises(openai.BadRequestError, match=key):
            c.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=4, **extra)
    with pytest.raises(openai.BadRequestError, match="n must be"):
        c.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=4, n=50)
    status, body = raw_post(
        base_url,
        "/chat/completions",
        json.dumps({"model": "alpha", "messages": MESSAGES, "mystery": 1}).encode(),
    )
    assert status == 400 and body["error"]["param"] == "mystery"


def test_a_flood_is_refused_with_retry_after_and_the_server_keeps_serving(serve_process):
    base_url, proc = serve_process
    body = json.dumps({"model": "alpha", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}).encode()

    def post(_):
        req = urllib.request.Request(
            base_url + "/chat/completions",
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, None
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Retry-After")

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(post, range(200)))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses.count(200) >= 4 and statuses.count(429) + statuses.count(503) >= 1
    assert all(retry == "1" for s, retry in results if s != 200)
    assert proc.poll() is None
    after = client(base_url).chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=4)
    assert after.choices[0].finish_reason in ("stop", "length")
    assert health(base_url)["queued"] == 0


# ------------------------------------------------------------------------------------------------
# In-process: the engine is inspected while requests run


@pytest.fixture(scope="module")
def live(tiny_llama):
    """The app on the tiny base model (no adapter) under uvicorn in a thread: (url, engine)."""
    from lorakit.core.config import ServeConfig
    from lorakit.inference.serve import Engine, build_app

    engine = Engine(ServeConfig(base_model=str(tiny_llama), max_tokens_limit=450, system_prompt=""))
    url, stop = serve_in_thread(build_app(engine))
    yield url, engine
    stop()
    engine.close()


def idle_within(engine, seconds: float) -> float:
    """Seconds until the engine generates nothing (fails after `seconds`)."""
    start = time.perf_counter()
    while engine.batch.status()["generating"]:
        assert time.perf_counter() - start < seconds, engine.batch.status()
        time.sleep(0.005)
    return time.perf_counter() - start


LONG = [{"role": "user", "content": "Tell me a long story."}]


def test_stop_string_and_disconnect_stop_the_generation(live):
    url, engine = live
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    full = c.chat.completions.create(model="base", messages=LONG, max_tokens=400, temperature=0)
    text = full.choices[0].message.content
    assert full.usage.completion_tokens == 400, "the tiny model should not stop by itself"
    # A stop string that first appears early in the answer.
    stop = next(text[k : k + 3] for k in range(4, len(text)) if text.find(text[k : k + 3]) == k)
    steps = engine.batch.steps
    chunks = list(
        c.chat.completions.create(
            model="base",
            messages=LONG,
            max_tokens=400,
            temperature=0,
            stop=stop,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text[: text.find(stop)]
    )
    assert chunks[-2].choices[0].finish_reason == "stop"
    idle_within(engine, 0.5)
    generated = chunks[-1].usage.completion_tokens
    assert generated < 400 and engine.batch.steps - steps == generated - 1  # nothing after the stop

    steps = engine.batch.steps
    conn = http.client.HTTPConnection(url.removeprefix("http://"))
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": "base", "messages": LONG, "max_tokens": 400, "temperature": 0, "stream": True}),
        {"Content-Type": "application/json"},
    )
    response = conn.getresponse()
    assert response.status == 200
    for _ in range(3):
        assert response.readline().startswith(b"data: ")
        response.readline()
    at_close = engine.batch.steps
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    idle_within(engine, 0.5)
    assert engine.batch.steps - at_close <= 10 and engine.batch.steps - steps < 399


def test_an_error_in_the_middle_of_a_stream_is_an_sse_event_then_done(live, monkeypatch):
    url, engine = live
    step, calls = engine.batch._step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("simulated failure")
        step()

    monkeypatch.setattr(engine.batch, "_step", failing_step)
    conn = http.client.HTTPConnection(url.removeprefix("http://"))
    body = {"model": "base", "messages": LONG, "max_tokens": 50, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    events = [line for line in conn.getresponse().read().decode().split("\n\n") if line]
    assert json.loads(events[-2].removeprefix("data: "))["error"]["message"].endswith("simulated failure")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    monkeypatch.undo()
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    assert (
        c.chat.completions.create(model="base", messages=MESSAGES, max_tokens=3).usage.completion_tokens == 3
    )
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
