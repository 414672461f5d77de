"""`lorakit serve` on a tiny model, driven with the official openai client."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from lorakit.config import TrainConfig
from lorakit.train import train

from .conftest import write_jsonl

openai = pytest.importorskip("openai")
KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama):
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
            "--api_key",
            KEY,
            "--max_tokens_limit",
            "64",
            "--max_request_bytes",
            "20000",
        ],
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


def test_models_chat_stream_and_adapters(server):
    base_url, _ = server
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


def test_errors_and_the_server_keeps_serving(server):
    base_url, proc = server
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
