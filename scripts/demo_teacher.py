"""A scripted teacher for the demo task: an OpenAI-compatible HTTP server (stdlib only) that
answers `lorakit synth` / `lorakit improve` with correct 65816 samples for the group it is asked
about, made with the demo data generator's own opcode tables (scripts/make_demo_data.py).

It is a stand-in for a real teacher model (Ollama, vLLM, a hosted API), honest about what it is:
it reads the failing rows quoted in the request, takes their mnemonic and addressing mode, and
writes K new rows of the same kind with random operands and the demo's instruction phrasings.
Like real teachers it also copies one of the rows it was shown into each answer (the
near-duplicate check must remove it; `--no-copy` turns that off).

Protocol faults for tests: `faults` is a list consumed one per request, each one of
ok, garbage, refusal, partial_json, empty, wrong (rows with wrong bytes), 429, 500, timeout,
drop (a body cut short), not_json (HTTP 200 whose body is not JSON).

Run: python scripts/demo_teacher.py --port 8765   (then --teacher_url http://127.0.0.1:8765/v1)
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import DIRECT, IMMEDIATE, IMPLIED, INSTRUCTIONS  # noqa: E402

MODEL = "demo-teacher"


def demo_rows(inputs: list[str], k: int, rng: random.Random) -> list[dict]:
    """k correct rows of the same mnemonic and addressing mode as the first parsable input."""
    for text in inputs:
        m = re.fullmatch(r"\s*([A-Z]{3})(?:\s+(#?)\$([0-9A-F]{2}))?\s*", text.upper())
        if not m:
            continue
        mnemonic, immediate, operand = m.group(1), m.group(2), m.group(3)
        table = IMPLIED if operand is None else IMMEDIATE if immediate else DIRECT
        if mnemonic not in table:
            continue
        rows = []
        for _ in range(k):
            value = rng.randrange(256)
            asm = mnemonic if operand is None else f"{mnemonic} {immediate}${value:02X}"
            code = table[mnemonic] if operand is None else f"{table[mnemonic]} {value:02X}"
            rows.append({"instruction": rng.choice(INSTRUCTIONS), "input": asm, "output": code})
        return rows
    return []


def shown_rows(prompt: str) -> list[dict]:
    """The JSON rows quoted in a synth request (one object per line)."""
    rows = []
    for line in prompt.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "input" in row:
                rows.append(row)
    return rows


class Teacher:
    """The server's state: the fault script, the requests seen (for tests) and a seeded RNG."""

    def __init__(self, faults: list[str] | None = None, copy: bool = True, seed: int = 0, delay: float = 0.0):
        self.faults = list(faults or [])
        self.copy, self.delay = copy, delay
        self.rng = random.Random(seed)
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def next_fault(self) -> str:
        with self.lock:
            return self.faults.pop(0) if self.faults else "ok"

    def answer(self, body: dict) -> str:
        prompt = "\n".join(m.get("content") or "" for m in body.get("messages", []))
        k = int(m.group(1)) if (m := re.search(r"Write (\d+) new", prompt)) else 4
        shown = shown_rows(prompt)
        with self.lock:
            rows = demo_rows([r["input"] for r in shown], k, self.rng)
        if self.copy and shown and rows:
            first = shown[0]
            rows[-1] = {key: first[key] for key in ("instruction", "input", "output") if key in first}
        return json.dumps(rows, indent=1)


def make_handler(teacher: Teacher):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, payload: bytes, headers: dict | None = None, length: int | None = None):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload) if length is None else length))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()

        def do_GET(self):
            self._send(
                200, json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()
            )

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            fault = teacher.next_fault()
            with teacher.lock:
                teacher.requests.append({"body": body, "fault": fault, "time": time.time()})
            if teacher.delay:
                time.sleep(teacher.delay)
            if fault == "429":
                return self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "0"})
            if fault == "500":
                return self._send(500, b'{"error": {"message": "boom"}}')
            if fault == "timeout":
                time.sleep(float(body.get("metadata", {}).get("sleep", 3)))
                return self._send(500, b'{"error": {"message": "too late"}}')
            if fault == "not_json":
                return self._send(200, b"<html>gateway says hi</html>")
            content = {
                "garbage": "Sure! Here are some ideas: LDA is a load, STA is a store. Have fun!",
                "refusal": "I'm sorry, but I can't help with that request.",
                "empty": "",
            }.get(fault)
            if content is None:
                content = teacher.answer(body)
                if fault == "partial_json":
                    content = content[: int(len(content) * 0.6)]
                if fault == "wrong":  # plausible rows with the wrong bytes: only a verifier sees it
                    rows = json.loads(content)
                    content = json.dumps([{**r, "output": "EA " + r["output"]} for r in rows])
            reply = {
                "id": "chatcmpl-demo",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", MODEL),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "length" if fault == "partial_json" else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": len(json.dumps(body)) // 4,
                    "completion_tokens": len(content) // 4 + 1,
                    "total_tokens": len(json.dumps(body)) // 4 + len(content) // 4 + 1,
                },
            }
            payload = json.dumps(reply).encode()
            if fault == "drop":  # promise more bytes than sent, then hang up
                self._send(200, payload[: len(payload) // 2], length=len(payload))
                self.close_connection = True
                return
            self._send(200, payload)

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that gave up: not the server's fault
        pass


def start(port: int = 0, **kwargs) -> tuple[ThreadingHTTPServer, Teacher]:
    """Serve in a background thread on 127.0.0.1:`port` (0 = any free port); returns the server
    (its `server_address[1]` is the port) and the teacher state."""
    teacher = Teacher(**kwargs)
    server = Server(("127.0.0.1", port), make_handler(teacher))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--faults", default="", help="comma-separated faults for the first requests")
    p.add_argument("--no-copy", action="store_true", help="never copy a shown row into an answer")
    p.add_argument("--delay", type=float, default=0.0, help="seconds to wait before each answer")
    args = p.parse_args()
    server, _ = start(
        args.port, faults=[f for f in args.faults.split(",") if f], copy=not args.no_copy, delay=args.delay
    )
    print(f"demo teacher serving on http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
