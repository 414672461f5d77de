"""Helpers on sequences that several stages share."""

from __future__ import annotations

from collections.abc import Sequence


def common_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading items (characters, token ids) `a` and `b` share. Slices compare in C, so a
    binary search over them beats a Python loop on long texts and prompts."""
    if type(a) is not type(b):  # a tuple and a list of the same ids compare unequal
        a, b = list(a), list(b)
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo
