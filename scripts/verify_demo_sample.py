"""Verifier for the demo task (`lorakit synth --verify "python scripts/verify_demo_sample.py"`):
reads one alpaca sample as JSON on stdin and exits 0 when its output is the right encoding of its
input, by the demo data generator's own opcode tables (scripts/make_demo_data.py); otherwise it
exits 1 with the reason on stderr.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import DIRECT, IMMEDIATE, IMPLIED  # noqa: E402


def assemble(asm: str) -> str | None:
    """The bytes of one demo instruction as 'A9 12', or None when it is not one."""
    m = re.fullmatch(r"([A-Z]{3})(?:\s+(#?)\$([0-9A-F]{2}))?", asm.strip().upper())
    if not m:
        return None
    mnemonic, immediate, operand = m.groups()
    if operand is None:
        return IMPLIED.get(mnemonic)
    opcode = (IMMEDIATE if immediate else DIRECT).get(mnemonic)
    return f"{opcode} {operand}" if opcode else None


def main() -> int:
    try:
        sample = json.loads(sys.stdin.read())
    except ValueError as e:
        print(f"not JSON: {e}", file=sys.stderr)
        return 1
    expected = assemble(str(sample.get("input", "")))
    if expected is None:
        print(f"not a demo instruction: {sample.get('input')!r}", file=sys.stderr)
        return 1
    got = " ".join(str(sample.get("output", "")).upper().split())
    if got != expected:
        print(f"{sample.get('input')} assembles to {expected}, not {got}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
