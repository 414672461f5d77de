"""`lorakit eval`: did the fine-tune help? Loss, perplexity, generation scores, stop rate, failures.

The scores follow published definitions, stated in METRIC_DEFINITIONS (and in every eval.md):
exact match and token F1 are SQuAD v2.0's (its answer normalization), ROUGE-L is rouge-score's
LCS F-measure on tokens of any script, chrF is sacrebleu's corpus-level chrF.
"""

from __future__ import annotations

import json
import math
import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..core.config import EvalConfig
from ..core.errors import LorakitError
from ..core.files import atomic_write_json, atomic_write_text, say
from ..core.labels import IGNORE_INDEX
from ..core.runfiles import EVAL, FAILURES

METRICS = ("exact_match", "token_f1", "rouge_l", "chrf")
METRIC_DEFINITIONS = {
    "exact_match": "SQuAD v2.0 exact match: 1 when prediction and reference are equal after SQuAD's "
    "answer normalization (lowercase; punctuation removed, Unicode punctuation included; the articles "
    "a/an/the removed; whitespace collapsed), else 0; mean over rows.",
    "token_f1": "SQuAD v2.0 F1: harmonic mean of precision and recall of the tokens the normalized "
    "prediction and reference share (as multisets); tokens are whitespace-separated words, and each "
    "Chinese/Japanese character is a token of its own (as MLQA scores Chinese); 1 when both are empty; "
    "mean over rows.",
    "rouge_l": "ROUGE-L F-measure (rouge-score's LCS F1): longest common subsequence of tokens, "
    "P = LCS/prediction tokens, R = LCS/reference tokens, F = 2PR/(P+R); tokens are lowercased runs of "
    "letters and digits of any script, each Chinese/Japanese character a token (rouge-score's default "
    "tokenizer would drop all non-ASCII text); no stemming; mean over rows.",
    "chrf": "chrF, corpus level (sacrebleu's CHRF defaults: character n-grams 1-6, beta 2, whitespace "
    "ignored): n-gram matches are summed over all rows before precision and recall are computed, as "
    "sacrebleu's corpus_score does; not a mean of row scores. The per-row chrf in eval.json is sentence "
    "chrF.",
}

# Scripts written without spaces between words: each character is a token.
_CJK = "\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f"
_CJK_OR_WORD = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")
_CJK_OR_RUN = re.compile(f"[{_CJK}]|[^{_CJK}]+")


def _is_punctuation(ch: str) -> bool:
    """SQuAD removes string.punctuation; Unicode punctuation (。，「」…) goes too, as in MLQA, so
    other scripts are normalized alike. On ASCII text this is exactly SQuAD's normalization."""
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize(text: str) -> str:
    """SQuAD's answer normalization: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if not _is_punctuation(ch))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def _answer_tokens(text: str) -> list[str]:
    return [piece for word in normalize(text).split() for piece in _CJK_OR_RUN.findall(word)]


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD v2.0's F1 over normalized answer tokens (CJK characters one token each)."""
    pred, ref = _answer_tokens(prediction), _answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class AnyScriptTokenizer:
    """rouge-score's tokenizer interface: lowercased letter/digit runs of any script, CJK characters
    one token each, punctuation dropped."""

    def tokenize(self, text: str) -> list[str]:
        return _CJK_OR_WORD.findall(text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=AnyScriptTokenizer())
    return scorer.score(reference, prediction)["rougeL"].fmeasure


def chrf(prediction: str, reference: str) -> float:
    """Sentence chrF in 0..1 (sacrebleu reports 0..100): one row's score."""
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(prediction, [reference]).score / 100


def corpus_chrf(predictions: list[str], references: list[str]) -> float:
    """Corpus chrF in 0..1: sacrebleu's corpus_score (statistics summed over rows first)."""
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score(predictions, [references]).score / 100 if predictions else 0.0


def row_scores(prediction: str, reference: str) -> dict[str, float]:
    return {
        "exact_match": exact_match(prediction, reference),
        "token_f1": token_f1(prediction, reference),
        "rouge_l": rouge_l(prediction, reference),
        "chrf": chrf(prediction, reference),
    }


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match, token F1 and ROUGE-L: means over rows; chrF: corpus level."""
    rows = [row_scores(p, r) for p, r in zip(predictions, references)]
    return _summary_scores(rows, predictions, references)


def _summary_scores(rows: list[dict], predictions: list[str], references: list[str]) -> dict[str, float]:
    means = {m: sum(r[m] for r in rows) / max(len(rows), 1) for m in METRICS if m != "chrf"}
    return {**means, "chrf": corpus_chrf(predictions, references)}


# --------------------------------------------------------------------------------------------


@dataclass
class RowResult:
    source: str
    messages: list[dict]
    reference: str
    generation: str
    stopped: bool
    new_tokens: int
    reference_tokens: int
    loss: float
    scores: dict[str, float]


def row_losses(model, examples: list[dict], pad_id: int, batch_size: int) -> list[tuple[float, int]]:
    """(summed NLL, supervised tokens) per row: loss on exactly the tokens training supervises."""
    import torch
    import torch.nn.functional as F

    from ..training.batching import Collator

    collate = Collator(pad_id)
    out = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"].to(model.device),
                attention_mask=batch["attention_mask"].to(model.device),
            ).logits.float()
        labels = batch["labels"].to(logits.device)[:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        for row in range(nll.shape[0]):
            mask = labels[row] != IGNORE_INDEX
            out.append((nll[row][mask].sum().item(), int(mask.sum().item())))
    return out


def run_eval(model, tokenizer, chat, samples, examples, cfg: EvalConfig) -> tuple[dict, list[RowResult]]:
    from ..inference.generate import generate_batch

    conversations = [s.messages[:-1] for s in samples]
    references = [s.messages[-1]["content"] for s in samples]
    losses = row_losses(model, examples, tokenizer.pad_token_id, cfg.eval_batch_size)
    generations = generate_batch(
        model,
        tokenizer,
        chat,
        conversations,
        cfg.max_new_tokens,
        temperature=0.0,
        batch_size=cfg.eval_batch_size,
    )
    rows = []
    for s, ref, g, (nll, n) in zip(samples, references, generations, losses):
        ref_tokens = len(tokenizer(ref, add_special_tokens=False)["input_ids"])
        rows.append(
            RowResult(
                s.where,
                s.messages,
                ref,
                g.text,
                g.stopped,
                g.new_tokens,
                ref_tokens,
                nll / max(n, 1),
                row_scores(g.text, ref),
            )
        )
    total_nll, total_tokens = sum(x for x, _ in losses), sum(n for _, n in losses)
    loss = total_nll / max(total_tokens, 1)
    summary = {
        "rows": len(rows),
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        **_summary_scores([r.scores for r in rows], [r.generation for r in rows], references),
        "stop_rate": sum(r.stopped for r in rows) / max(len(rows), 1),
        "mean_generated_tokens": sum(r.new_tokens for r in rows) / max(len(rows), 1),
        "mean_reference_tokens": sum(r.reference_tokens for r in rows) / max(len(rows), 1),
    }
    summary["length_ratio"] = summary["mean_generated_tokens"] / max(summary["mean_reference_tokens"], 1e-9)
    return summary, rows


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate an adapter (or merged model), optionally beside its base; writes the reports."""
    import dataclasses

    from ..data.encode import Samples, encode_data, load_samples
    from ..data.sources import demo_path
    from ..inference.generate import load_for_inference
    from ..models.adapter import inference_system_prompt, open_adapter

    if cfg.adapter and cfg.model:
        raise LorakitError("give --adapter or --model, not both")
    trained = open_adapter(cfg.adapter)
    system = inference_system_prompt(cfg.system_prompt, trained)
    # The loss covers the assistant turns the adapter was trained on (its --train_on).
    train_on = trained.settings.train_on if trained else cfg.train_on
    data_cfg = dataclasses.replace(
        cfg,
        dataset=cfg.dataset or str(demo_path("test")),
        system_prompt=system,
        val_size=0.0,
        val_dataset="",
        train_on=train_on,
    )
    loaded = load_samples(data_cfg)
    samples = [s for s in loaded.train if s.messages is not None]
    if not samples:
        raise LorakitError(
            f"{data_cfg.dataset}: no conversation rows to evaluate (raw text rows have no reference answer)"
        )
    if cfg.max_rows:
        samples = samples[: cfg.max_rows]
    model, tokenizer, chat = load_for_inference(
        cfg.model or cfg.base_model, trained or "", cfg.trust_remote_code
    )
    # A subset of the file's rows (conversations, --max_rows): encoded as it is, not cached.
    subset = Samples(samples, [], loaded.report)
    examples = encode_data(subset, chat, data_cfg, max_seq_length=1 << 30, cache=False).train
    encoded = {e["source"] for e in examples}  # --skip_bad_rows may have skipped some: keep rows aligned
    samples = [s for s in samples if s.where in encoded]
    label = "tuned" if (cfg.adapter or cfg.model) else "base"
    summary, rows = run_eval(model, tokenizer, chat, samples, examples, cfg)
    results = {label: summary}
    base_rows = None
    if cfg.compare_base and cfg.adapter:
        with model.disable_adapter():
            base_summary, base_rows = run_eval(model, tokenizer, chat, samples, examples, cfg)
        results = {"base": base_summary, "tuned": summary}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "dataset": data_cfg.dataset,
        "adapter": cfg.adapter,
        "model": cfg.model,
        "system_prompt": system,
        "loss_turns": train_on,
        **results,
    }
    if "base" in results:
        report["delta"] = {
            k: results["tuned"][k] - results["base"][k] for k in summary if isinstance(summary[k], float)
        }
    report["rows"] = [
        {
            "source": r.source,
            "reference": r.reference,
            "generation": r.generation,
            "stopped": r.stopped,
            "loss": r.loss,
            **r.scores,
            **({"base_generation": b.generation} if base_rows else {}),
        }
        for r, b in zip(rows, base_rows or rows)
    ]
    atomic_write_json(out / EVAL, report)
    atomic_write_text(out / "eval.md", markdown_report(report, results))
    _bar_chart(results, out / "eval.png")
    _write_failures(rows, cfg.failures, out / FAILURES)
    print_report(results, rows, base_rows)
    say(f"lorakit: eval report in {out} (eval.json, eval.md, eval.png, failures.jsonl)")
    return report


def _write_failures(rows: list[RowResult], n: int, path: Path) -> None:
    """The worst rows by score and by loss, as chat rows with the reference answer, ready to be
    corrected and added to the training data; what the model said rides along in extra keys."""
    by_score = sorted(rows, key=lambda r: (r.scores["token_f1"], -r.loss))[:n]
    by_loss = sorted(rows, key=lambda r: -r.loss)[:n]
    seen, lines = set(), []
    for why, r in [("low score", r) for r in by_score] + [("high loss", r) for r in by_loss]:
        if r.source in seen:
            continue
        seen.add(r.source)
        lines.append(
            json.dumps(
                {
                    "messages": r.messages,
                    "generation": r.generation,
                    "why": why,
                    "source": r.source,
                    "loss": round(r.loss, 4),
                    "token_f1": round(r.scores["token_f1"], 4),
                    "stopped": r.stopped,
                },
                ensure_ascii=False,
            )
        )
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def markdown_report(report: dict, results: dict) -> str:
    cols = list(results)
    lines = [
        f"# Evaluation: {report['dataset']}",
        "",
        f"Adapter: `{report['adapter'] or report['model'] or 'base model'}`",
        "",
        "| metric | " + " | ".join(cols) + (" | change |" if "delta" in report else " |"),
        "|---|" + "---|" * len(cols) + ("---|" if "delta" in report else ""),
    ]
    for k in results[cols[0]]:
        if k == "rows":
            continue
        vals = " | ".join(f"{results[c][k]:.4g}" for c in cols)
        delta = (
            f" | {report['delta'][k]:+.4g}"
            if "delta" in report and k in report["delta"]
            else (" | " if "delta" in report else "")
        )
        lines.append(f"| {k} | {vals}{delta} |")
    lines += [
        "",
        f"{results[cols[0]]['rows']} rows. Loss and perplexity: over the tokens of "
        + (
            "every assistant turn"
            if report.get("loss_turns") != "last_assistant"
            else "the last assistant turn"
        )
        + " (as training supervised them); the scores compare the last turn's answer. Stop rate: share of answers that ended with the end-of-turn token "
        "before the token limit (a model that never stops is the most common fine-tuning failure).",
        "",
        "## What each score is",
        "",
        *(f"- **{name}**: {text}" for name, text in METRIC_DEFINITIONS.items()),
        "",
    ]
    return "\n".join(lines)


def _bar_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [*METRICS, "stop_rate"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(results)
    for k, (name, summary) in enumerate(results.items()):
        ax.bar([i + k * width for i in range(len(metrics))], [summary[m] for m in metrics], width, label=name)
    ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(metrics))], metrics)
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def print_report(results: dict, rows: list[RowResult], base_rows=None, shown: int = 6) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    examples = Table(title="Held-out rows" + (": base vs fine-tuned" if base_rows else ""))
    for col in ["prompt", "reference", *(["base answer"] if base_rows else []), "answer"]:
        examples.add_column(col, overflow="fold")
    for k, r in enumerate(rows[:shown]):
        prompt = r.messages[-2]["content"].split("\n\n")[-1]
        cells = [_one_line(prompt), _one_line(r.reference)]
        if base_rows:
            cells.append(_one_line(base_rows[k].generation))
        examples.add_row(*cells, _one_line(r.generation))
    console.print(examples)
    cols = list(results)
    t = Table(title=f"Scores on {len(rows)} rows")
    t.add_column("metric")
    for c in cols:
        t.add_column(c, justify="right")
    if len(cols) == 2:
        t.add_column("change", justify="right")
    for k in results[cols[0]]:
        if k == "rows":
            continue
        vals = [results[c][k] for c in cols]
        cells = [f"{v:.1%}" if k in (*METRICS, "stop_rate") else f"{v:.3f}" for v in vals]
        if len(cols) == 2:
            d = results["tuned"][k] - results["base"][k]
            cells.append(f"{d:+.1%}" if k in (*METRICS, "stop_rate") else f"{d:+.3f}")
        t.add_row(k, *cells)
    console.print(t)


def _one_line(text: str, width: int = 48) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
