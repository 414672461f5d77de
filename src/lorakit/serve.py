"""`lorakit serve`: an OpenAI-compatible HTTP server on transformers, for local use and tests.

Built on the standard library's ThreadingHTTPServer: the API surface is three endpoints, and no
web framework is needed for that. Several adapters share one base (PEFT multi-adapter) and the
request's `model` field picks one; generation runs one request at a time. For production serving
use `lorakit export vllm` or `lorakit export ollama`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .config import ServeConfig
from .errors import LorakitError
from .io import say


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Engine:
    """The loaded model, its adapters, and generation under one lock."""

    def __init__(self, cfg: ServeConfig):
        from .adapter import Adapter, inference_system_prompt
        from .generate import load_for_inference

        self.cfg = cfg
        adapters: dict[str, Adapter] = {}
        for spec in cfg.adapter:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise LorakitError(f"--adapter {spec!r}: write NAME=DIR")
            if name == "base" or name in adapters:
                raise LorakitError(f"--adapter {spec!r}: the name {name!r} is taken")
            adapters[name] = Adapter.open(path)
        first = next(iter(adapters.values()), None)
        self.system = inference_system_prompt(cfg.system_prompt, first)
        self.model, self.tokenizer, self.chat = load_for_inference(
            cfg.base_model, first or "", cfg.trust_remote_code
        )
        # PEFT loads the first adapter under the name "default"; the others keep the user's names.
        self.peft_names = {name: ("default" if k == 0 else name) for k, name in enumerate(adapters)}
        for name, adapter in list(adapters.items())[1:]:
            self.model.load_adapter(str(adapter.path), adapter_name=name)
        self.adapters = adapters
        self.names = [*adapters, "base"]
        self.created = int(time.time())
        self.lock = threading.Lock()
        self.stop = self.chat.stop_ids()
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop[0]

    def select(self, name: str):
        """A context manager that runs generation with the named adapter (or none for 'base')."""
        import contextlib

        if name not in self.names:
            raise ApiError(
                404,
                f"The model '{name}' does not exist; available: {', '.join(self.names)}",
                "model",
                "model_not_found",
            )
        if not self.adapters:
            return contextlib.nullcontext()
        if name == "base":
            return self.model.disable_adapter()
        self.model.set_adapter(self.peft_names[name])
        return contextlib.nullcontext()


def _validate_sampling(body: dict, limit: int) -> dict:
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", min(256, limit)))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ApiError(400, "max_tokens must be a positive integer", "max_tokens")
    if max_tokens > limit:
        raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {limit}", "max_tokens")
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    for key, value, hi in (("temperature", temperature, 2.0), ("top_p", top_p, 1.0)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= hi:
            raise ApiError(400, f"{key} must be a number between 0 and {hi:g}", key)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of strings", "stop")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "stream must be a boolean", "stream")
    return {
        "max_tokens": max_tokens,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "stop": stop,
        "stream": body.get("stream", False),
    }


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(
                400, f"messages[{i}].role must be system, user or assistant", f"messages[{i}].role"
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(
                p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return out


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Handler(BaseHTTPRequestHandler):
    """One HTTP request; the engine and the admission semaphore live on the server."""

    protocol_version = "HTTP/1.1"
    server_version = "lorakit"
    server: Server

    @property
    def engine(self) -> Engine:
        return self.server.engine

    @property
    def cfg(self) -> ServeConfig:
        return self.server.engine.cfg

    def log_message(self, fmt, *args):
        sys.stderr.write(f"lorakit serve: {self.address_string()} {fmt % args}\n")

    # -- plumbing
    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, e: ApiError) -> None:
        self._send_json(e.status, e.body())

    def _authorize(self) -> None:
        if self.cfg.api_key and self.headers.get("Authorization", "") != f"Bearer {self.cfg.api_key}":
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "a Content-Length header is required")
        if int(length) > self.cfg.max_request_bytes:
            self.close_connection = True  # the body is not read: drop the connection afterwards
            raise ApiError(
                413, f"request body of {length} bytes exceeds the limit of {self.cfg.max_request_bytes}"
            )
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _guarded(self, work) -> None:
        try:
            work()
        except ApiError as e:
            self._fail(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # our bug: log it, answer in JSON, keep serving
            traceback.print_exc(file=sys.stderr)
            self._fail(ApiError(500, "internal server error", kind="server_error"))

    # -- routes
    def do_GET(self):
        def work():
            self._authorize()
            if self.path.rstrip("/") != "/v1/models":
                raise ApiError(404, f"no route GET {self.path}")
            data = [
                {"id": n, "object": "model", "created": self.engine.created, "owned_by": "lorakit"}
                for n in self.engine.names
            ]
            self._send_json(200, {"object": "list", "data": data})

        self._guarded(work)

    def do_POST(self):
        def work():
            self._authorize()
            route = self.path.rstrip("/")
            if route not in ("/v1/chat/completions", "/v1/completions"):
                raise ApiError(404, f"no route POST {self.path}")
            body = self._body()
            if not self.server.admitted.acquire(blocking=False):
                raise ApiError(429, "too many concurrent requests; retry later", kind="rate_limit_error")
            try:
                self._complete(body, chat=route.endswith("chat/completions"))
            finally:
                self.server.admitted.release()

        self._guarded(work)

    def _complete(self, body: dict, chat: bool) -> None:
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "model must be a string", "model")
        params = _validate_sampling(body, self.cfg.max_tokens_limit)
        if chat:
            messages = _messages(body)
            if self.engine.system and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.engine.system}] + messages
            ids = self.engine.chat.encode_prompt(messages)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "prompt must be a non-empty string", "prompt")
            ids = self.engine.tokenizer(prompt)["input_ids"]
        from .generate import stream_text, stream_tokens

        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        kind = "chat.completion" if chat else "text_completion"
        with self.engine.lock, self.engine.select(model):
            tokens = stream_tokens(
                self.engine.model,
                ids,
                self.engine.stop,
                self.engine.pad,
                params["max_tokens"],
                params["temperature"],
                params["top_p"],
            )
            if params["stream"]:
                self._stream(
                    rid,
                    kind,
                    model,
                    stream_text(self.engine.tokenizer, tokens, self.engine.stop),
                    params["stop"],
                    chat,
                )
                return
            generated = list(tokens)
        finished = [t for t in generated if t not in self.engine.stop]
        reason = "stop" if len(finished) < len(generated) else "length"
        text = self.engine.tokenizer.decode(
            finished, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        text, hit = _cut_at_stop(text, params["stop"])
        reason = "stop" if hit else reason
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            if chat
            else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        )
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": len(generated),
            "total_tokens": len(ids) + len(generated),
        }
        self._send_json(
            200,
            {
                "id": rid,
                "object": kind,
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "usage": usage,
            },
        )

    def _stream(self, rid, kind, model, pieces, stops, chat) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        created = int(time.time())
        obj = f"{kind}.chunk" if chat else kind

        def event(delta_text: str | None, reason: str | None, first: bool = False):
            if chat:
                delta = (
                    {"role": "assistant", "content": ""}
                    if first
                    else ({"content": delta_text} if delta_text else {})
                )
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": reason}
            chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        if chat:
            event(None, None, first=True)
        text, reason = "", "length"
        for piece, done in pieces:
            before = text
            text += piece
            cut, hit = _cut_at_stop(text, stops)
            if hit:
                event(cut[len(before) :], None)
                reason = "stop"
                break
            if piece:
                event(piece, None)
            if done:
                reason = done
        event(None, reason)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    """The HTTP server with what every request handler shares."""

    daemon_threads = True

    def __init__(self, address, engine: Engine):
        self.engine = engine
        self.admitted = threading.BoundedSemaphore(engine.cfg.max_concurrent_requests)
        super().__init__(address, Handler)


def serve(cfg: ServeConfig, ready: threading.Event | None = None) -> None:
    engine = Engine(cfg)
    try:
        server = Server((cfg.host, cfg.port), engine)
    except OSError as e:
        raise LorakitError(
            f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); pick another --port"
        ) from None
    host, port = server.server_address[:2]
    say(
        f"lorakit: serving {', '.join(engine.names)} on http://{host}:{port}/v1"
        + (" (API key required)" if cfg.api_key else ""),
        flush=True,
    )
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        say("lorakit: warning: listening beyond this machine without --api_key", flush=True)
    if ready is not None:
        ready.set()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
