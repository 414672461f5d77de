"""`lorakit serve` under load: N concurrent openai clients vs the same requests one at a time.

The embedded SmolLM2-135M-Instruct base with two LoRA adapters (random, made here with PEFT: r=16
on the seven projections) served by `lorakit serve`; requests cycle over the two adapters and the
base. Each round sends N requests all at once from N threads (one official `openai` client each),
then the same N requests one at a time. Prints aggregate completion tokens/s and p50/p95 latency of
both, their ratio, and whether every concurrent answer is the one-at-a-time answer, token for token
(same text and same completion token count; greedy decoding).

The server keeps the keys and values of recent prompts (its prefix cache), so the order is chosen
to flatter the one-at-a-time pass, never the concurrent one: each round's questions were never sent
before, the concurrent pass runs them first (cached: only the chat template head, from the warm-up)
and the one-at-a-time pass repeats them (cached: all but each prompt's last token). The ratio is
therefore a lower bound on what the same prompts would give with both passes cold.

    python benchmarks/serve_load.py                       # 8 clients, 32 new tokens, 2 rounds
    python benchmarks/serve_load.py --clients 4 --rounds 1 --max_tokens 16
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish and German.",
    "What does LDA #$12 do on a 65816?",
    "Give me a name for a grey cat.",
    "How many legs does a spider have?",
    "Summarise the plot of Hamlet in one line.",
    "What is 17 times 23?",
    "Suggest a title for a blog post about gardening.",
]
# More questions for runs of more than 12 requests: no prompt of a round may have been sent before
# (any two of these share at most their first word or two after the chat template head).
TOPICS = ["volcanoes", "bicycles", "honey bees", "lighthouses", "glaciers", "violins", "comets", "bread"]
OPENINGS = [
    "Describe",
    "Tell me a fact about",
    "Why do people like",
    "Write one sentence on",
    "Name a risk of",
]


def questions(count: int) -> list[str]:
    """`count` distinct questions, the handwritten ones first."""
    extra = [f"{opening} {topic}." for opening in OPENINGS for topic in TOPICS]
    pool = QUESTIONS + extra
    if count > len(pool):
        raise SystemExit(f"{count} requests need more than the {len(pool)} distinct questions here")
    return pool[:count]


SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(where: Path) -> list[str]:
    """Two random LoRA adapters on the embedded base, saved as PEFT directories."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.models.loading import resolve_base_model

    base_dir = resolve_base_model("").path
    specs = []
    for k, name in enumerate(("alpha", "beta")):
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        torch.manual_seed(k + 1)
        config = LoraConfig(r=16, lora_alpha=32, target_modules=SEVEN, init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():  # small enough to keep the answers readable, large enough to change them
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.02)
        peft_model.save_pretrained(where / name)
        specs.append(f"{name}={where / name}")
    return specs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(adapters: list[str], port: int, rows: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lorakit", "serve", "--adapter", *adapters, "--port", str(port)]
    cmd += ["--threads", str(threads)]
    cmd += ["--max_concurrent_requests", str(rows), "--max_queued_requests", str(4 * rows)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "serving" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc
    raise RuntimeError(f"the server exited ({proc.wait()})")


def ask(client, model: str, question: str, max_tokens: int) -> tuple[str, int, float]:
    start = time.perf_counter()
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return r.choices[0].message.content, r.usage.completion_tokens, time.perf_counter() - start


def one_at_a_time(client, requests, max_tokens):
    start = time.perf_counter()
    answers = [ask(client, m, q, max_tokens) for m, q in requests]
    return answers, time.perf_counter() - start


def concurrently(clients, requests, max_tokens):
    answers: list = [None] * len(requests)
    barrier = threading.Barrier(len(requests) + 1)

    def run(k):
        barrier.wait()
        answers[k] = ask(clients[k], *requests[k], max_tokens)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return answers, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def report(name: str, answers: list, wall: float) -> float:
    tokens = sum(a[1] for a in answers)
    latencies = [a[2] for a in answers]
    rate = tokens / wall
    print(
        f"{name:<16} {len(answers):>4} req {tokens:>6} tok {wall:>8.1f} s {rate:>8.1f} tok/s"
        f"   latency p50 {percentile(latencies, 50):6.2f} s  p95 {percentile(latencies, 95):6.2f} s"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="the server's --threads (0 = one per core)")
    args = parser.parse_args()
    from openai import OpenAI

    models = ["alpha", "beta", "base"]
    pool = questions(args.clients * args.rounds)  # every request of the run has its own question
    rounds = [
        [(models[k % 3], pool[r * args.clients + k]) for k in range(args.clients)] for r in range(args.rounds)
    ]
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(make_adapters(Path(tmp)), port := free_port(), args.clients, args.threads)
        try:
            url = f"http://127.0.0.1:{port}/v1"
            clients = [
                OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600) for _ in range(args.clients)
            ]
            for m in models:  # warm-up
                ask(clients[0], m, "Hello", 4)
            alone, together, same, total = [], [], 0, 0
            alone_wall = together_wall = 0.0
            for requests in rounds:  # concurrent first, on prompts never sent: see the docstring
                t, wall = concurrently(clients, requests, args.max_tokens)
                together, together_wall = together + t, together_wall + wall
                a, wall = one_at_a_time(clients[0], requests, args.max_tokens)
                alone, alone_wall = alone + a, alone_wall + wall
                for x, y in zip(a, t):
                    total += 1
                    same += (x[0], x[1]) == (y[0], y[1])
                    if (x[0], x[1]) != (y[0], y[1]):
                        print(
                            f"DIFFERENT: alone {x[0]!r} ({x[1]} tokens) vs together {y[0]!r} ({y[1]} tokens)"
                        )
        finally:
            server.terminate()
            server.wait(30)
    threads = args.threads or "one per core"
    print(
        f"\n{args.clients} clients, greedy, max_tokens {args.max_tokens}, {args.rounds} round(s), threads {threads}"
    )
    print(
        "order: each round's questions are new; concurrent pass first (prefix cache: chat template head"
        " only), then the same requests one at a time (prefix cache: all but the last prompt token)"
    )
    seq = report("one at a time", alone, alone_wall)
    con = report(f"{args.clients} concurrent", together, together_wall)
    print(f"aggregate tokens/s: {con / seq:.2f}x one at a time")
    print(f"answers identical to the one-at-a-time answer: {same}/{total}")
    print(f"distinct answers: {len({(m, a[0]) for (m, _), a in zip(sum(rounds, []), alone)})}/{len(alone)}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
