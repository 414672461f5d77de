"""A teacher model behind any OpenAI-compatible endpoint (Ollama, vLLM, `lorakit serve`, a hosted
API), asked through the official `openai` client with its own retries off: lorakit retries
timeouts, 429s (honouring Retry-After), 5xx answers and dropped connections itself, so that each
fault is counted and reported, and a teacher that keeps failing costs a group, never the run.

The answer's text is read leniently (`parse_samples`): a JSON array, an object holding one, JSON
lines, a fenced block, or the complete objects of an answer cut short.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import LorakitError

# Transport faults: retried; content faults: counted, the group keeps what could be read.
RETRIED = ("timeout", "rate_limited", "server_error", "connection", "not_json")
REFUSAL = re.compile(r"\b(I can(?:no|')t|I'm sorry|I am sorry|I won't|unable to (?:help|comply))\b", re.I)


@dataclass
class TeacherReply:
    """One group's answer: the text (None when every try failed), tokens paid, faults met."""

    text: str | None
    tokens: int = 0
    faults: list[str] = field(default_factory=list)
    finish_reason: str = ""
    tokens_estimated: bool = False

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "faults": self.faults,
            "finish_reason": self.finish_reason,
            "tokens_estimated": self.tokens_estimated,
        }

    @classmethod
    def from_json(cls, d: dict) -> TeacherReply:
        return cls(
            d.get("text"),
            int(d.get("tokens", 0)),
            list(d.get("faults", [])),
            d.get("finish_reason", ""),
            bool(d.get("tokens_estimated")),
        )


class Teacher:
    """Chat completions from `url` with model `model`; `cfg` holds the teacher_* settings."""

    def __init__(self, cfg: Any, sleep=time.sleep):
        if not cfg.teacher_url:
            raise LorakitError(
                "--teacher_url is required: the base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1"
            )
        if not cfg.teacher_model:
            raise LorakitError("--teacher_model is required: the model name the teacher endpoint serves")
        try:
            import openai
        except ImportError:
            raise LorakitError("the teacher needs the openai client: pip install openai") from None
        self.cfg, self.sleep, self.openai = cfg, sleep, openai
        key = os.environ.get(cfg.teacher_api_key_env, "") if cfg.teacher_api_key_env else ""
        self.client = openai.OpenAI(
            base_url=cfg.teacher_url, api_key=key or "none", timeout=cfg.teacher_timeout, max_retries=0
        )

    def ask(self, messages: list[dict], max_tokens: int) -> TeacherReply:
        """One request, retried on transport faults; never raises for a teacher fault (only for
        a refused key or an unknown URL/model, which no retry mends)."""
        faults: list[str] = []
        for attempt in range(self.cfg.teacher_retries + 1):
            fault, wait = self._try(messages, max_tokens)
            if isinstance(fault, TeacherReply):
                fault.faults[:0] = faults
                return fault
            faults.append(fault)
            if attempt < self.cfg.teacher_retries:
                self.sleep(wait if wait is not None else self.cfg.teacher_backoff * 2**attempt)
        return TeacherReply(None, 0, faults)

    def _try(self, messages: list[dict], max_tokens: int) -> tuple[TeacherReply | str, float | None]:
        openai = self.openai
        try:
            response = self.client.chat.completions.create(
                model=self.cfg.teacher_model,
                messages=messages,
                max_tokens=max_tokens,
                temperature=self.cfg.teacher_temperature,
            )
        except openai.APITimeoutError:
            return "timeout", None
        except openai.RateLimitError as e:
            return "rate_limited", retry_after(e.response.headers.get("retry-after"))
        except openai.APIStatusError as e:
            if e.status_code in (401, 403):
                raise LorakitError(
                    f"--teacher_url {self.cfg.teacher_url}: HTTP {e.status_code}, the key was refused; "
                    f"put the API key in the environment variable {self.cfg.teacher_api_key_env}"
                ) from None
            if e.status_code == 404:
                raise LorakitError(
                    f"--teacher_url {self.cfg.teacher_url} / --teacher_model {self.cfg.teacher_model}: HTTP 404; "
                    "check the URL (it usually ends in /v1) and the model name"
                ) from None
            return ("server_error" if e.status_code >= 500 else f"http_{e.status_code}"), None
        except openai.APIConnectionError:
            return "connection", None
        except ValueError:  # an HTTP 200 whose body is not JSON (a proxy's error page)
            return "not_json", None
        return _reply(response, messages), None


def _reply(response: Any, messages: list[dict]) -> TeacherReply:
    choices = getattr(response, "choices", None) or []
    message = choices[0].message if choices else None
    text = (getattr(message, "content", None) or "") if message is not None else ""
    refusal = getattr(message, "refusal", None) if message is not None else None
    usage = getattr(response, "usage", None)
    tokens = int(getattr(usage, "total_tokens", 0) or 0) if usage is not None else 0
    estimated = tokens == 0
    if estimated:  # an endpoint that reports no usage: ~4 characters per token
        tokens = (sum(len(m["content"]) for m in messages) + len(text)) // 4 + 1
    reply = TeacherReply(text, tokens, [], (choices[0].finish_reason or "") if choices else "", estimated)
    if refusal and not text:
        reply.text, reply.faults = refusal, ["refusal"]
    return reply


def retry_after(value: str | None) -> float | None:
    """Seconds a 429's Retry-After asks for (a number, or an HTTP date), at most 120."""
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), 120.0)
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        return min(max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0), 120.0)
    except (TypeError, ValueError):
        return None


def parse_samples(text: str) -> tuple[list[Any], str | None]:
    """The items of a teacher's answer and the content fault, if any: None (clean JSON),
    'partial' (only complete objects of a cut or broken answer), 'refusal', 'malformed', 'empty'."""
    if not text or not text.strip():
        return [], "empty"
    body = text.strip()
    fenced = re.search(r"```(?:json|jsonl)?\s*\n(.*?)(?:```|$)", body, re.S)
    if fenced:
        body = fenced.group(1).strip()
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(lists) == 1 else [value]
    if isinstance(value, list):
        return value, None
    objects = _complete_objects(body)
    if objects:
        lines_ok = all(line.strip().startswith("{") for line in body.splitlines() if line.strip())
        return objects, None if lines_ok and _all_lines_parse(body) else "partial"
    return [], "refusal" if REFUSAL.search(text) else "malformed"


def _all_lines_parse(body: str) -> bool:
    try:
        for line in body.splitlines():
            if line.strip():
                json.loads(line)
    except ValueError:
        return False
    return True


def _complete_objects(text: str) -> list[dict]:
    """Every top-level JSON object that decodes on its own, left to right (JSON lines, or the
    whole objects before the cut of a truncated array)."""
    decoder, out, i = json.JSONDecoder(), [], text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            out.append(obj)
        i = text.find("{", end)
    return out
