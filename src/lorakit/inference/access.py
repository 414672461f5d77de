"""Who may talk to lorakit's local web servers (`serve`, `dashboard`).

A server on 127.0.0.1 is reachable by every web page the user opens, not only by their own
programs. Four rules close that, as Ollama and Jupyter do:
  Host     the Host header must name the address the server is bound to (127.0.0.1, localhost,
           ::1 or the --host given): a page that rebinds its own DNS name to 127.0.0.1 is refused.
           A wildcard bind (0.0.0.0, ::) needs a key, which such a page does not have.
  Origin   a browser request from another origin (another site, or another port) is refused
           unless --allowed_origins / LORAKIT_ALLOWED_ORIGINS names it; allowed origins get CORS
           answers (preflights included) so that their pages can read the replies.
  JSON     a request that changes state (POST, PUT, PATCH, DELETE) must be `application/json`:
           a page cannot send that cross-origin without a preflight, which is refused.
  Key      `Authorization: Bearer KEY` on every non-public path when a key is set (serve's
           --api_key, the dashboard's per-launch token).
Starlette provides the Host check (TrustedHostMiddleware) and the CORS answers (CORSMiddleware);
neither refuses a cross-origin "simple" request or a non-JSON body, and that is what this adds.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import json
import os
import re
from dataclasses import dataclass

from ..core.errors import LorakitError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
ORIGINS_ENV = "LORAKIT_ALLOWED_ORIGINS"
KEY_ENV = "LORAKIT_API_KEY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_origins(given: list[str]) -> list[str]:
    """--allowed_origins plus the comma-separated LORAKIT_ALLOWED_ORIGINS, without trailing slashes."""
    extra = [o.strip() for o in os.environ.get(ORIGINS_ENV, "").split(",")]
    return [o.rstrip("/") for o in [*given, *extra] if o.strip()]


def configured_key(cfg) -> str:
    """--api_key, else LORAKIT_API_KEY (which `ps` does not show), else ''."""
    return cfg.api_key or os.environ.get(KEY_ENV, "")


def check_bind(host: str, key: str, insecure_no_key: bool) -> None:
    """A server reachable from other machines needs a key, unless the user says otherwise."""
    if not is_loopback(host) and not key and not insecure_no_key:
        raise LorakitError(
            f"--host {host or '0.0.0.0'} listens beyond this machine without a key: set --api_key "
            "(or LORAKIT_API_KEY), or pass --insecure_no_key to accept anyone who can reach it"
        )


@dataclass(frozen=True)
class Access:
    """The rules of one server: the address it is bound to, the extra origins, the key and the
    paths anyone may read without it."""

    host: str = "127.0.0.1"
    origins: tuple[str, ...] = ()
    key: str = ""
    public: tuple[str, ...] = ()  # shell patterns of paths: "/", "/assets/*"

    def hosts(self) -> list[str]:
        if self.host in WILDCARD_HOSTS:
            return ["*"]
        bound = f"[{self.host}]" if ":" in self.host else self.host
        return list(dict.fromkeys([*LOOPBACK_HOSTS, bound.lower()]))

    def origin_pattern(self) -> str | None:
        """One regular expression for the allowed origins (shell patterns: `http://*.example`)."""
        if not self.origins:
            return None
        # `[` and `]` are literal in an origin (http://[::1]:3000), a character class to fnmatch
        literal = (re.sub(r"[][]", lambda m: f"[{m.group()}]", o) for o in self.origins)
        return "|".join(fnmatch.translate(o) for o in literal)

    def is_public(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, p) for p in self.public)


def access_for(cfg, key: str) -> Access:
    """The rules of a server from its config (serve's or the dashboard's ListenArgs)."""
    return Access(host=cfg.host, origins=tuple(allowed_origins(cfg.allowed_origins)), key=key)


LOCAL = Access()  # bound to 127.0.0.1, no other origin, no key


def error_body(
    message: str, code: str | None = None, kind: str = "invalid_request_error", param=None
) -> dict:
    """OpenAI's error shape, which its clients show: serve's errors and this module's refusals."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def _send_refusal(send, status: int, message: str, code: str) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(error_body(message, code)).encode()})


def _refuse(scope: dict, access: Access, allowed_origin: re.Pattern | None) -> tuple[int, str, str] | None:
    """(status, message, code) when the request breaks a rule, else None. The Host is already checked."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    origin = headers.get("origin", "").rstrip("/")
    own = {f"http://{headers.get('host', '')}", f"https://{headers.get('host', '')}"}
    if origin and origin not in own and not (allowed_origin and allowed_origin.fullmatch(origin)):
        return (
            403,
            f"cross-origin request from {origin} refused: allow that origin with --allowed_origins "
            f"(or {ORIGINS_ENV})",
            "origin_not_allowed",
        )
    if scope["method"] in STATE_CHANGING:
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            return (
                415,
                f"{scope['method']} {scope['path']} needs a JSON body (Content-Type: application/json), "
                f"not {media or 'none'}",
                "unsupported_media_type",
            )
    if access.key and not access.is_public(scope["path"]):  # allowed preflights never get here
        given = headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {access.key}".encode()):
            return 401, "Incorrect API key provided.", "invalid_api_key"
    return None


async def _drain(receive, limit: int = 1 << 20) -> None:
    """Read (and drop) up to `limit` bytes of the refused request's body first: a server that
    closes a connection with unread bytes resets it, and the client never reads the refusal."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        seen += len(message.get("body", b""))


def guarded(app, access: Access):
    """`app` behind the four rules: Host (Starlette's check) -> CORS answers for allowed origins
    (Starlette's) -> origin, JSON and key refusals (this module) -> app."""
    from starlette.middleware.cors import CORSMiddleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    pattern = access.origin_pattern()
    allowed_origin = re.compile(pattern) if pattern else None

    async def refusing(scope, receive, send):
        if scope["type"] == "websocket":  # no route takes one, and a page may open one anywhere
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] == "http" and (why := _refuse(scope, access, allowed_origin)):
            await _drain(receive)
            await _send_refusal(send, *why)
            return
        await app(scope, receive, send)

    inner = refusing
    if allowed_origin is not None:
        inner = CORSMiddleware(
            refusing,
            allow_origin_regex=pattern,
            allow_methods=("GET", "POST", "OPTIONS"),
            allow_headers=("*",),  # the openai JS client adds x-stainless-* headers
        )
    return TrustedHostMiddleware(inner, allowed_hosts=access.hosts(), www_redirect=False)
