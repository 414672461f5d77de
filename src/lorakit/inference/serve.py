"""`lorakit serve`: an OpenAI-compatible HTTP server on transformers, for trying fine-tunes locally.

Several adapters share one base (PEFT); the request's `model` picks one (`base` = none), and
concurrent requests are generated together, each with its own adapter, by the batch engine
(inference/engine.py). For production serving use `lorakit export vllm` or `lorakit export ollama`.

The HTTP side is an ASGI app (Starlette) run by uvicorn, not the standard library's server:
- the engine streams tokens to many open requests at once; an asyncio loop holds those
  connections without a thread each, and it learns of a client that went away (the stream's send
  fails, or `http.disconnect` arrives) so that request's generation can be cancelled at once;
- a later dashboard can mount its routes on the same app and share the same engine, in one process,
  with one model in memory (`build_app` takes an already loaded Engine);
- uvicorn is what the usual Python OpenAI-compatible servers run on (llama-cpp-python's and
  LLaMA-Factory's, both FastAPI on uvicorn). FastAPI itself is not needed: requests are validated
  by hand so that every error has OpenAI's shape and status, and the routes are a handful.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace

from ..core.config import ServeConfig
from ..core.errors import LorakitError
from ..core.files import say
from .access import LOCAL, Access, access_for, check_bind, configured_key, error_body, guarded, is_loopback
from .decoding import Sampling
from .engine import BASE, BatchEngine, Busy, Event, Job

RETRY_AFTER_SECONDS = 1
# Accepted and without effect on the answer (bookkeeping on OpenAI's side).
NO_EFFECT = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "stream",
    "stream_options",
    "seed",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
} | NO_EFFECT
CHAT_KEYS = COMMON | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
}
COMPLETION_KEYS = COMMON | {"prompt", "echo", "best_of", "suffix"}


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


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
        return error_body(self.message, self.code, self.kind, self.param)


class Engine:
    """The loaded base model, its adapters and the batch engine that generates with them."""

    def __init__(self, cfg: ServeConfig):
        from ..models.adapter import Adapter, inference_system_prompt
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
        self.peft_names["base"] = BASE
        for name, adapter in list(adapters.items())[1:]:
            self.model.load_adapter(str(adapter.path), adapter_name=name)
        _full_precision_on_cpu(self.model)
        self.model.eval()  # PEFT runs mixed-adapter batches in eval mode only
        self.names = [*adapters, "base"]
        self.created = int(time.time())
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self.batch = BatchEngine(
            self.model,
            self.tokenizer,
            self.chat.stop_ids(),
            max_rows=cfg.max_concurrent_requests,
            max_queued=cfg.max_queued_requests,
            peft=bool(adapters),
            threads=cfg.threads,
        )

    def adapter(self, name: str) -> str:
        """The PEFT adapter name of a served model name (BASE for `base`)."""
        if name not in self.names:
            raise ApiError(
                404,
                f"The model '{name}' does not exist; available: {', '.join(self.names)}",
                "model",
                "model_not_found",
            )
        return self.peft_names[name]

    def model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "lorakit"}

    def close(self) -> None:
        self.batch.close()


def _full_precision_on_cpu(model) -> None:
    """fp32 on CPU: half-precision CPU matrix products round differently with the batch's size, so
    a request's greedy answer could change with who else is being served."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantized = getattr(base, "hf_quantizer", None) is not None
    if model.device.type == "cpu" and model.dtype != torch.float32 and not quantized:
        model.float()


# ------------------------------------------------------------------------------------------------
# Requests


@dataclass
class Parsed:
    model: str
    prompt: list[int]
    adapter: str
    sampling: Sampling
    n: int
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"{key} must be {what} between {lo:g} and {hi:g}", key)
    return value


def _refuse_unsupported(body: dict, chat: bool) -> None:
    """What lorakit does not do is refused with a 400 that says so, never silently ignored."""
    allowed = CHAT_KEYS if chat else COMPLETION_KEYS
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    refusals = [
        ("tools", bool(body.get("tools")), "tools (function calling) are not supported by lorakit serve"),
        ("functions", bool(body.get("functions")), "functions are not supported by lorakit serve"),
        ("tool_choice", body.get("tool_choice") not in (None, "none"), "tool_choice needs tools"),
        ("function_call", body.get("function_call") not in (None, "none"), "function_call needs functions"),
        ("logprobs", body.get("logprobs") not in (None, False, 0), "logprobs are not supported"),
        ("top_logprobs", body.get("top_logprobs") not in (None, 0), "logprobs are not supported"),
        ("logit_bias", bool(body.get("logit_bias")), "logit_bias is not supported"),
        (
            "presence_penalty",
            body.get("presence_penalty") not in (None, 0),
            "presence_penalty is not supported",
        ),
        (
            "frequency_penalty",
            body.get("frequency_penalty") not in (None, 0),
            "frequency_penalty is not supported",
        ),
        ("echo", bool(body.get("echo")), "echo is not supported"),
        ("suffix", body.get("suffix") not in (None, ""), "suffix (insertion) is not supported"),
        ("best_of", body.get("best_of") not in (None, 1), "best_of is not supported"),
    ]
    for key, refused, message in refusals:
        if refused:
            raise ApiError(400, f"{message} (parameter '{key}')", key, "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise ApiError(
            400,
            "response_format other than {'type': 'text'} (JSON mode, JSON schema) is not supported",
            "response_format",
            "unsupported_parameter",
        )


def _sampling(body: dict, cfg: ServeConfig) -> Sampling:
    limit = cfg.max_tokens_limit
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(256, limit)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ApiError(400, "max_tokens must be a positive integer", "max_tokens")
    if max_tokens > limit:
        raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {limit}", "max_tokens")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of at most 4 strings", "stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, "seed must be an integer", "seed")
    return Sampling(
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", cfg.temperature, 0, 2)),
        top_p=float(_number(body, "top_p", cfg.top_p, 0, 1)),
        top_k=_number(body, "top_k", cfg.top_k, 0, 1 << 30, integer=True),
        stop=stop,
        seed=seed,
    )


def _messages(body: dict, system: str) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(
                400,
                f"messages[{i}].role must be system, developer, user or assistant (tools are not supported)",
                f"messages[{i}].role",
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(
                    400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content"
                )
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        # The developer role is OpenAI's newer name for system instructions.
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if system and out[0]["role"] != "system":
        out = [{"role": "system", "content": system}, *out]
    return out


def parse_request(body: dict, chat: bool, engine: Engine) -> Parsed:
    _refuse_unsupported(body, chat)
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string", "model")
    sampling = _sampling(body, engine.cfg)
    adapter = engine.adapter(model)
    n = _number(body, "n", 1, 1, engine.cfg.max_concurrent_requests, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
    if chat:
        try:
            prompt = engine.chat.encode_prompt(_messages(body, engine.system))
        except ApiError:
            raise
        except Exception as e:  # the chat template refuses this conversation
            raise ApiError(400, f"the chat template cannot render these messages ({e})", "messages") from None
    else:
        text = body.get("prompt")
        if not isinstance(text, str) or not text:
            raise ApiError(
                400, "prompt must be a non-empty string (lists of prompts are not supported)", "prompt"
            )
        prompt = engine.tokenizer(text)["input_ids"]
    asked = body.get("max_completion_tokens", body.get("max_tokens")) is not None
    if engine.context and not asked:  # the default never runs past the context
        sampling.max_tokens = max(1, min(sampling.max_tokens, engine.context - len(prompt)))
    if engine.context and len(prompt) + sampling.max_tokens > engine.context:
        raise ApiError(
            400,
            f"the prompt ({len(prompt)} tokens) plus max_tokens ({sampling.max_tokens}) exceeds the "
            f"model's context of {engine.context} tokens",
            "messages" if chat else "prompt",
            "context_length_exceeded",
        )
    include_usage = bool((options or {}).get("include_usage"))
    return Parsed(model, prompt, adapter, sampling, n, stream, include_usage)


# ------------------------------------------------------------------------------------------------
# Responses


class Reply:
    """One request's generation: submitted to the engine, its events read on the event loop."""

    def __init__(self, engine: Engine, parsed: Parsed, chat: bool):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:  # called from the engine thread
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

        self.parsed, self.chat = parsed, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.job = Job(parsed.prompt, parsed.adapter, parsed.sampling, parsed.n, deliver)
        try:
            engine.batch.submit(self.job)
        except Busy as e:
            raise ApiError(
                503 if e.closing else 429, str(e), code="overloaded", kind="rate_limit_error"
            ) from None

    def usage(self) -> dict:
        prompt, completion = len(self.parsed.prompt), self.job.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        obj = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.parsed.model,
            "choices": choices,
        }
        if self.parsed.include_usage:
            obj["usage"] = usage
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def choice_delta(self, index: int, text: str | None, reason: str | None, first: bool = False) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}

    async def stream(self):
        """Server-sent events; the client going away cancels the generation (finally)."""
        try:
            if self.chat:
                yield self.chunk([self.choice_delta(i, None, None, first=True) for i in range(self.parsed.n)])
            while True:
                event = await self.events.get()
                if event.kind == "text":
                    yield self.chunk([self.choice_delta(event.index, event.text, None)])
                elif event.kind == "finish":
                    yield self.chunk([self.choice_delta(event.index, None, event.reason)])
                elif event.kind == "error":
                    error = ApiError(500, event.text, kind="server_error").body()
                    yield f"data: {json.dumps(error)}\n\n"
                    break
                elif event.kind == "done":
                    if self.parsed.include_usage:
                        yield self.chunk([], self.usage())
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancel()  # a no-op when it has finished

    async def complete(self, disconnected) -> dict:
        """The whole answer; a client that goes away first cancels the generation."""
        texts = [""] * self.parsed.n
        reasons: list[str | None] = [None] * self.parsed.n
        gone = asyncio.ensure_future(disconnected())
        try:
            while True:
                get = asyncio.ensure_future(self.events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    raise ClientGone
                event = get.result()
                if event.kind == "text":
                    texts[event.index] += event.text
                elif event.kind == "finish":
                    reasons[event.index] = event.reason
                elif event.kind == "error":
                    raise ApiError(500, event.text, kind="server_error")
                elif event.kind == "done":
                    break
        finally:
            gone.cancel()
            self.job.cancel()
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "logprobs": None,
                    "finish_reason": r,
                }
                for i, (t, r) in enumerate(zip(texts, reasons))
            ]
        else:
            choices = [
                {"index": i, "text": t, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons))
            ]
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.parsed.model,
            "choices": choices,
            "usage": self.usage(),
        }


# ------------------------------------------------------------------------------------------------
# The app


def build_app(engine: Engine, access: Access | None = LOCAL):
    """The ASGI app: OpenAI's routes plus /health, on an already loaded engine, behind `access`
    (lorakit.access: Host, Origin, JSON bodies and the key; /health needs no key).
    `access=None`: the bare app (the dashboard mounts it behind its own)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def fail(e: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def read_json(request: Request) -> dict:
        limit = engine.cfg.max_request_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of {limit}")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    async def health(request: Request):
        return JSONResponse({"status": "ok", "models": engine.names, **engine.batch.status()})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [engine.model_card(n) for n in engine.names]})

    async def model(request: Request):
        name = request.path_params["name"]
        engine.adapter(name)  # 404 when unknown
        return JSONResponse(engine.model_card(name))

    async def generate(request: Request, chat: bool):
        parsed = parse_request(await read_json(request), chat, engine)
        reply = Reply(engine, parsed, chat)
        if parsed.stream:
            return StreamingResponse(
                reply.stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        try:
            return JSONResponse(await reply.complete(disconnected))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")

    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    async def completions(request: Request):
        return await generate(request, chat=False)

    async def on_api_error(request: Request, e: ApiError):
        return fail(e)

    async def on_http_error(request: Request, e: HTTPException):
        if e.status_code == 405:
            return fail(ApiError(405, f"method {request.method} is not allowed on {request.url.path}"))
        return fail(ApiError(e.status_code, f"no route {request.method} {request.url.path}"))

    async def on_bug(request: Request, e: Exception):  # our bug: uvicorn logs it; answer in JSON
        return fail(ApiError(500, "internal server error", kind="server_error"))

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/models/{name:path}", model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_bug},
    )
    app.state.engine = engine
    return app if access is None else guarded(app, replace(access, public=("/health",)))


def url_host(host: str) -> str:
    """The address to print in a URL: a wildcard bind is reached here as 127.0.0.1."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LorakitError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from None
    sock.listen(2048)
    return sock


def serve(cfg: ServeConfig, ready: threading.Event | None = None) -> None:

    api_key = configured_key(cfg)
    check_bind(cfg.host, api_key, cfg.insecure_no_key)
    # A decode step is thousands of small operations: OpenMP workers that spin between them take
    # the CPU from the thread with the work whenever the cores are shared (on a busy 2-core
    # machine, 8 rows ran 10-20x slower). Read when torch loads, so only if it has not yet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    engine = Engine(cfg)
    try:
        sock = listen(cfg.host, cfg.port)
    except LorakitError:
        engine.close()
        raise
    host, port = sock.getsockname()[:2]
    what = f"serving {', '.join(engine.names)} on http://{url_host(host)}:{port}/v1"
    what += " (API key required)" if api_key else ""
    run_app(build_app(engine, access_for(cfg, api_key)), sock, what, bool(api_key), ready, engine.close)


def run_app(app, sock: socket.socket, what: str, keyed: bool, ready: threading.Event | None, close) -> None:
    """Run an ASGI app on a listening socket under uvicorn until interrupted (serve, dashboard),
    then `close()` what it holds. `keyed`: a key or token guards it."""
    import uvicorn

    host = sock.getsockname()[0]
    say(f"lorakit: {what}", flush=True)
    if not is_loopback(host) and not keyed:
        say("lorakit: warning: listening beyond this machine without an API key", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    if ready is not None:
        ready.set()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        close()
        sock.close()
