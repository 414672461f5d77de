"""Duplicate rows and the validation split."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..core.errors import LorakitError
from .formats import DataReport, Sample


class SeenSamples:
    """Which samples were seen, by a 16-byte hash of their content: ~100 bytes a row in memory,
    so exact duplicates are found in a million rows without holding the rows."""

    def __init__(self):
        self.hashes: set[bytes] = set()

    def add(self, sample: Sample) -> bool:
        """Record the sample; False if it was seen before."""
        h = sample.digest()
        if h in self.hashes:
            return False
        self.hashes.add(h)
        return True

    def __contains__(self, sample: Sample) -> bool:
        return sample.digest() in self.hashes


def iter_unique(samples: Iterable[Sample], seen: SeenSamples, report: DataReport) -> Iterator[Sample]:
    """The samples not seen before (the first of each duplicate is kept); the dropped rows are
    listed in report.duplicates and the kept ones counted by format."""
    for s in samples:
        if seen.add(s):
            report.formats[s.format] = report.formats.get(s.format, 0) + 1
            yield s
        else:
            report.duplicates.append(s.where)


def dedupe(samples: list[Sample]) -> tuple[list[Sample], list[str]]:
    """Drop exact duplicates (same messages or text), keeping the first; returns the dropped rows."""
    report = DataReport()
    kept = list(iter_unique(samples, SeenSamples(), report))
    return kept, report.duplicates


def validation_indices(n: int, val_size: float, seed: int) -> set[int]:
    """Which of n de-duplicated rows are held out for validation: deterministic under the seed;
    duplicates were removed first, so none cross the split."""
    import random

    if val_size <= 0:
        return set()
    k = int(val_size) if val_size >= 1 else max(1, round(n * val_size))
    if k >= n:
        raise LorakitError(f"--val_size {val_size:g} leaves no training rows ({n} rows after de-duplication)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[:k])


def split_validation(samples: list[Sample], val_size: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training, validation) samples, in their order (validation_indices)."""
    val_idx = validation_indices(len(samples), val_size, seed)
    return [s for i, s in enumerate(samples) if i not in val_idx], [
        s for i, s in enumerate(samples) if i in val_idx
    ]
