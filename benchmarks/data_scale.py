"""`lorakit data check` at scale: synthetic instruction rows with a long-tailed length (median ~200
tokens), first run (encoding) and second run (the encoded-dataset cache), wall time, rows/s and
peak RSS of the whole process.

    python benchmarks/data_scale.py --rows 52000            # Alpaca size
    python benchmarks/data_scale.py --rows 1000000          # OpenHermes size

The data cache is cleared before the first run (`lorakit data cache --clear`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the of and to in is that for it as with was on be by this are or from at an but not have which "
    "register value memory address byte bank stack loop branch return load store compare increment"
).split()


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = max(12, int(rng.lognormvariate(5.0, 0.6)))  # ~1 token per word here
            answer = max(4, words // 3)
            prompt = " ".join(rng.choice(WORDS) for _ in range(words - answer))
            output = " ".join(rng.choice(WORDS) for _ in range(answer))
            f.write(json.dumps({"instruction": f"{prompt} ({i})", "input": "", "output": output}) + "\n")


def timed(argv: list[str]) -> tuple[float, float, str, float]:
    """(wall seconds, peak RSS in MiB, output, CPU seconds of the process and its workers) of a
    command, through GNU time. The CPU time says what the machine's other load hid: on a quiet
    2-core machine the wall time approaches CPU / 2."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    cpu = sum(float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", proc.stderr))
    return wall, rss, proc.stdout, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=52000)
    parser.add_argument("--keep", action="store_true", help="keep the generated data file")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="lorakit-data-scale-"))
    data = folder / "rows.jsonl"
    write_rows(data, args.rows)
    lorakit = [sys.executable, "-m", "lorakit"]
    subprocess.run([*lorakit, "data", "cache", "--clear"], check=True, capture_output=True)
    check = [*lorakit, "data", "check", str(data), "--max_seq_length", "2048", "--preview", "0"]
    baseline, base_rss, _, _ = timed(
        [sys.executable, "-c", "import lorakit.data.doctor, lorakit.models.loading, transformers"]
    )
    load = os.getloadavg()[0]
    first, first_rss, out, first_cpu = timed(check)
    second, second_rss, _, second_cpu = timed(check)
    p50 = re.search(r"p50 (\d+)", out)
    print(
        f"rows: {args.rows:,} (median {p50.group(1) if p50 else '?'} tokens), file {data.stat().st_size / 2**20:.0f} MiB"
    )
    print(f"start-up alone (imports): {baseline:.1f} s, {base_rss:.0f} MiB")
    print(f"machine load before the runs (1-minute average): {load:.1f} on {os.cpu_count()} cores")
    print(
        f"first run (encode + cache): {first:.1f} s, {args.rows / first:,.0f} rows/s, peak RSS {first_rss:.0f} MiB, "
        f"CPU {first_cpu:.1f} s"
    )
    print(
        f"second run (cache hit):     {second:.1f} s, {args.rows / second:,.0f} rows/s, peak RSS {second_rss:.0f} MiB, "
        f"CPU {second_cpu:.1f} s"
    )
    print(f"cached / first: {second / first:.2f}x the time")
    if not args.keep:
        data.unlink()


if __name__ == "__main__":
    main()
