"""The data doctor: `lorakit data check` (what training would see) and `lorakit data convert`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

from ..core.config import DataCheckConfig, DataConvertConfig, size_band
from ..core.errors import LorakitError
from ..core.files import atomic_write_json, atomic_write_text, say
from ..core.labels import IGNORE_INDEX
from .encode import encode_data, length_policy, row_lengths, supervised_counts
from .formats import to_samples
from .sources import demo_path, load_rows
from .split import dedupe
from .template import ChatFormat


def percentile(values: list[int], q: float, ordered: bool = False) -> int:
    """Nearest-rank percentile (q in 0..100) of a non-empty list (`ordered`: already sorted)."""
    ordered_values = values if ordered else sorted(values)
    return ordered_values[max(0, math.ceil(q / 100 * len(ordered_values)) - 1)]


def recommend(n_rows: int, lengths: list[int]) -> dict:
    """The guide's rules of thumb for rank and epochs by dataset size, and a max_seq_length that
    keeps every row unless a few outliers would more than double it."""
    (r_lo, r_hi), (e_lo, e_hi) = size_band(n_rows)
    longest, p99 = max(lengths), percentile(lengths, 99)
    target = longest if longest <= 2 * p99 else p99
    return {
        "lora_r": f"{r_lo}-{r_hi}",
        "num_epochs": f"{e_lo}-{e_hi}",
        "max_seq_length": int(math.ceil(target / 64) * 64),
    }


def check(cfg: DataCheckConfig) -> dict:
    """Validate and tokenize the data exactly as `train` would, and report what it found."""
    from ..models.loading import load_tokenizer, resolve_base_model

    tokenizer = load_tokenizer(resolve_base_model(cfg.base_model), cfg.trust_remote_code)
    chat = ChatFormat(tokenizer)
    # Every row encoded once at full length (the length report), then the policy on the training rows.
    full = encode_data(None, chat, cfg, max_seq_length=1 << 30, allow_empty=True)
    train_lengths = row_lengths(full.train)
    lengths = train_lengths + row_lengths(full.val)
    report = dataclasses.replace(
        full.report, lengths=[], tokens=0, supervised_tokens=0, dropped_overlength=[], truncated=[]
    )
    within = supervised_counts(full.train, cfg.max_seq_length)
    over = [i for i, n in enumerate(train_lengths) if n > cfg.max_seq_length]  # only these can go
    report.kept = len(train_lengths) - len(over)
    for i in over:
        where = full.train.source(i) if hasattr(full.train, "source") else full.train[i]["source"]
        policy = length_policy(where, train_lengths[i], within[i], cfg.max_seq_length, cfg.overlength, report)
        report.kept += policy is not None
    supervised = sum(supervised_counts(full.train)) + sum(supervised_counts(full.val))
    preview = list(full.train[: cfg.preview])
    ordered = sorted(lengths)
    result = {
        "dataset": cfg.dataset or str(demo_path("train")),
        "rows": report.rows,
        "formats": report.formats,
        "train_rows": report.kept,
        "validation_rows": report.val_rows,
        "duplicates_dropped": report.duplicates,
        "bad_rows_skipped": report.skipped,
        "over_max_seq_length": {
            "max_seq_length": cfg.max_seq_length,
            "policy": cfg.overlength,
            "dropped": report.dropped_overlength,
            "truncated": report.truncated,
        },
        "tokens": sum(lengths),
        "supervised_fraction": supervised / max(sum(lengths), 1),
        "length_percentiles": {f"p{q}": percentile(ordered, q, ordered=True) for q in (50, 90, 95, 99)}
        | {"max": max(lengths)},
        "boundary_merges": report.boundary_merges,
        "split_conversations": report.split_conversations,
        "chat_template": "ChatML fallback (the tokenizer has none)"
        if chat.fallback
        else "the tokenizer's own",
        "chat_template_sha256": hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()[:16],
        "recommended": recommend(report.rows, lengths),
        "lengths": lengths,
        "preview": [_mask_preview(e, tokenizer) for e in preview],
    }
    _print_check(result, preview, tokenizer)
    if cfg.plot:
        _plot_lengths(lengths, cfg.max_seq_length, Path(cfg.plot))
    if cfg.output:
        atomic_write_json(cfg.output, result)
    return result


def _print_check(r: dict, preview: list[dict], tokenizer) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    t = Table(title=f"Data check: {r['dataset']}", show_header=False)
    t.add_column("what")
    t.add_column("value", overflow="fold")
    t.add_row("rows", f"{r['rows']} ({', '.join(f'{k}: {v}' for k, v in r['formats'].items())})")
    t.add_row("train / validation", f"{r['train_rows']} / {r['validation_rows']}")
    t.add_row("duplicates dropped", _first(r["duplicates_dropped"]))
    t.add_row("bad rows skipped", _first(r["bad_rows_skipped"]))
    over = r["over_max_seq_length"]
    t.add_row(
        f"over max_seq_length {over['max_seq_length']}",
        f"dropped {_first(over['dropped'])}; truncated {_first(over['truncated'])} (--overlength {over['policy']})",
    )
    t.add_row("tokens", f"{r['tokens']:,} ({r['supervised_fraction']:.1%} supervised)")
    t.add_row("length percentiles", ", ".join(f"{k} {v}" for k, v in r["length_percentiles"].items()))
    t.add_row("chat template", f"{r['chat_template']} (sha256 {r['chat_template_sha256']})")
    if r["boundary_merges"]:
        t.add_row(
            "token merges across turns", f"{r['boundary_merges']} rows (trained as inference sees them)"
        )
    if r["split_conversations"]:
        t.add_row(
            "conversations split into rows",
            f"{r['split_conversations']} (the chat template rewrites earlier turns: one row per run of turns)",
        )
    rec = r["recommended"]
    t.add_row(
        "recommended",
        f"--max_seq_length {rec['max_seq_length']}, --lora_r {rec['lora_r']}, --num_epochs {rec['num_epochs']}",
    )
    console.print(t)
    console.print(_text_histogram(r["lengths"]))
    for e in preview:
        text = Text(f"--- {e['source']} (supervised tokens in green)\n", style="bold")
        for tok_id, label in zip(e["input_ids"], e["labels"]):
            text.append(tokenizer.decode([tok_id]), style="bold green" if label != IGNORE_INDEX else "dim")
        console.print(text)


def _mask_preview(example: dict, tokenizer) -> dict:
    """A rendered row as runs of text, each marked supervised (carries the loss) or not."""
    pieces: list[list] = []
    for tok_id, label in zip(example["input_ids"], example["labels"]):
        supervised = label != IGNORE_INDEX
        text = tokenizer.decode([tok_id])
        if pieces and pieces[-1][1] == supervised:
            pieces[-1][0] += text
        else:
            pieces.append([text, supervised])
    return {"source": example["source"], "pieces": pieces}


def _first(items: list[str]) -> str:
    return "0" if not items else f"{len(items)} (first: {items[0]})"


def _text_histogram(lengths: list[int], bins: int = 10, width: int = 40) -> str:
    lo, hi = min(lengths), max(lengths)
    step = max(1, math.ceil((hi - lo + 1) / bins))
    bins = math.ceil((hi - lo + 1) / step)
    counts = [0] * bins
    for n in lengths:
        counts[min((n - lo) // step, bins - 1)] += 1
    top = max(counts)
    lines = ["token lengths:"]
    for k, c in enumerate(counts):
        a = lo + k * step
        lines.append(
            f"  {a:>6}-{a + step - 1:<6} {'#' * max(1 if c else 0, round(width * c / top)):<{width}} {c}"
        )
    return "\n".join(lines)


def _plot_lengths(lengths: list[int], max_seq_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="#4477aa")
    ax.axvline(max_seq_length, color="#cc3311", linestyle="--", label=f"max_seq_length {max_seq_length}")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def convert(cfg: DataConvertConfig) -> Path:
    """Write the data as normalised messages-JSONL ({"messages": [...]}, or {"text": ...} rows)."""
    if not cfg.output:
        raise LorakitError("data convert needs --output FILE.jsonl")
    rows = load_rows(cfg.dataset or str(demo_path("train")), cfg.skip_bad_rows)
    samples, skipped = to_samples(rows, cfg.dataset_format, cfg.system_prompt or "", cfg.skip_bad_rows)
    samples, duplicates = dedupe(samples)
    lines = [
        json.dumps(
            {"messages": s.messages} if s.messages is not None else {"text": s.text}, ensure_ascii=False
        )
        for s in samples
    ]
    out = atomic_write_text(cfg.output, "\n".join(lines) + "\n")
    say(
        f"lorakit: wrote {len(samples)} rows to {out} ({len(duplicates)} duplicates dropped, {len(skipped)} bad rows skipped)"
    )
    for msg in skipped:
        say(f"  skipped {msg}")
    return out
