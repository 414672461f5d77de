"""`lorakit synth`: new training rows aimed at what the model gets wrong, from a teacher model.

failures.jsonl (written by `lorakit eval`) -> groups of failing rows that ask the same kind of
thing -> one request per group to a teacher behind an OpenAI-compatible endpoint for K new rows,
with the failing rows as context -> every row checked -> synth.jsonl, rejected.jsonl and a report.

Groups: a failing row's *pattern* is the last paragraph of its prompt (alpaca: the input) with
numbers, hex values and quoted strings replaced by placeholders, cut to 8 words: `STA $85` and
`STA $1F` are one group, `STA $85` and `LDA #$85` two. Simple enough to read in the report.

Checks, in order (the first that fails is the row's reason): the JSON shape (an object with string
instruction / input / output), the data doctor's row rules (`data.to_sample`), a length limit,
near-duplicates (held-out rows first, then training rows, then rows already kept), and last the
optional `--verify` command (the row as JSON on stdin, exit 0 = keep), the only check that costs a
process per row.

Near-duplicates: rows are compared on their prompt and answer with lines that recur in many
reference rows removed (an instruction template shared by a third of the data says nothing about
which question a row asks). A row is a duplicate when its prompt or its prompt + answer equals a
reference row's after normalisation (case, spacing), or when the Jaccard similarity of their
character 5-gram sets reaches --near_duplicate. Similarity is estimated with MinHash (64 hashes,
256 bytes per reference row), so memory grows with the number of rows, not their length.

Every teacher reply is written to teacher/GROUP.json (atomically) the moment it arrives; a run
started again reuses those replies and pays nothing twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shlex
import subprocess
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import SynthConfig
from ..core.errors import LorakitError
from ..core.fields import write_yaml
from ..core.files import atomic_write_json, atomic_write_text, say
from ..core.runfiles import EVAL, FAILURES
from .teacher import Teacher, TeacherReply, parse_samples

REASONS = ("shape", "invalid", "too_long", "duplicate_eval", "duplicate_train", "duplicate_synth", "verify")


# ---------------------------------------------------------------------------------------------
# Failures and their groups


@dataclass
class Failure:
    where: str
    prompt: str  # the last user turn
    reference: str
    generation: str
    stopped: bool


@dataclass
class Group:
    id: str
    pattern: str
    rows: list[Failure]

    @property
    def kinds(self) -> dict[str, int]:
        """What went wrong: a wrong answer, or no answer end before the token limit."""
        return dict(Counter("never stopped" if not r.stopped else "wrong answer" for r in self.rows))


def pattern(prompt: str) -> str:
    """The kind of question a prompt asks: its last paragraph, values masked, 8 words at most."""
    last = [p for p in re.split(r"\n\s*\n", prompt.strip()) if p.strip()][-1:] or [""]
    text = last[0]
    text = re.sub(r"\"[^\"]*\"|'[^']*'", '"S"', text)
    text = re.sub(r"(\$|0x)[0-9A-Fa-f]+\b", r"\1N", text)
    text = re.sub(r"\b\d+(\.\d+)?\b", "N", text)
    return " ".join(text.split()[:8])


def read_failures(path: str | Path) -> list[Failure]:
    """The rows of a failures.jsonl (or of the eval directory holding one) the model got wrong."""
    from ..data.sources import read_jsonl
    from .evaluate import exact_match

    path = Path(path).expanduser()
    if path.is_dir():
        path = path / FAILURES
    if not path.is_file():
        raise LorakitError(f"--failures {path}: no such file (give the failures.jsonl `lorakit eval` wrote)")
    out = []
    for where, row in read_jsonl(path):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or len(messages) < 2 or "generation" not in row:
            raise LorakitError(f"{where}: not a failures.jsonl row (needs messages and generation)")
        reference, prompt = messages[-1].get("content", ""), messages[-2].get("content", "")
        if exact_match(str(row["generation"]), reference):
            continue  # listed for its loss, but answered right: nothing to teach
        out.append(Failure(where, prompt, reference, str(row["generation"]), bool(row.get("stopped", True))))
    return out


def group_failures(failures: list[Failure], max_groups: int) -> list[Group]:
    """Failures by pattern, the largest groups first (ties: first seen), at most `max_groups`."""
    by: dict[str, list[Failure]] = {}
    for f in failures:
        by.setdefault(pattern(f.prompt), []).append(f)
    ranked = sorted(by.items(), key=lambda kv: -len(kv[1]))[:max_groups]
    return [
        Group("g" + hashlib.blake2b(k.encode(), digest_size=4).hexdigest(), k, rows) for k, rows in ranked
    ]


# ---------------------------------------------------------------------------------------------
# Near-duplicates


def _norm(line: str) -> str:
    return " ".join(line.lower().split())


def _line_hash(line: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(line.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big"
    )


class NearDuplicates:
    """Reference rows (held-out, training, kept) for the duplicate checks: hashes of each row's
    normalised prompt and prompt + answer, and a MinHash signature of its character 5-grams."""

    HASHES, NGRAM, PRIME = 64, 5, (1 << 61) - 1

    def __init__(self, template_lines: set[int], threshold: float):
        import numpy as np

        self.np, self.template, self.threshold = np, template_lines, threshold
        rng = np.random.default_rng(65816)
        self.a = rng.integers(1, 1 << 31, self.HASHES, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 31, self.HASHES, dtype=np.uint64)
        self.exact: dict[int, tuple[str, str]] = {}
        self.signatures: dict[str, list] = {}  # kind -> one signature array per row
        self.stacked: dict[str, object] = {}  # kind -> the signatures as one matrix, when asked
        self.where: dict[str, list[str]] = {}

    def content(self, prompt: str, answer: str) -> tuple[str, str]:
        """Prompt and answer without template lines, normalised."""

        def keep(text: str) -> str:
            lines = [_norm(x) for x in text.splitlines() if x.strip()]
            kept = [x for x in lines if _line_hash(x) not in self.template]
            return "\n".join(kept or lines)

        return keep(prompt), keep(answer)

    def signature(self, text: str):
        np = self.np
        n = self.NGRAM
        grams = {text[i : i + n] for i in range(max(len(text) - n + 1, 1))}
        h = np.fromiter(
            (zlib.crc32(g.encode("utf-8", "surrogatepass")) for g in grams), np.uint64, len(grams)
        )
        return ((h[None, :] * self.a[:, None] + self.b[:, None]) % np.uint64(self.PRIME)).min(axis=1)

    def add(self, kind: str, where: str, prompt: str, answer: str) -> None:
        p, a = self.content(prompt, answer)
        for key in ([_line_hash("P\x1f" + p)] if p else []) + [_line_hash(f"R\x1f{p}\x1f{a}")]:
            self.exact.setdefault(key, (kind, where))
        self.signatures.setdefault(kind, []).append(self.signature(p + "\n" + a))
        self.stacked[kind] = None
        self.where.setdefault(kind, []).append(where)

    def match(self, prompt: str, answer: str) -> tuple[str, str, float] | None:
        """(kind, where, similarity) of the reference row this one duplicates, or None."""
        np = self.np
        p, a = self.content(prompt, answer)
        for key in ([_line_hash("P\x1f" + p)] if p else []) + [_line_hash(f"R\x1f{p}\x1f{a}")]:
            if key in self.exact:
                return (*self.exact[key], 1.0)
        sig = self.signature(p + "\n" + a)
        for kind in ("eval", "train", "synth"):
            if not self.signatures.get(kind):
                continue
            if self.stacked.get(kind) is None:
                self.stacked[kind] = np.stack(self.signatures[kind])
            similarity = (self.stacked[kind] == sig).mean(axis=1)
            best = int(similarity.argmax())
            if similarity[best] >= self.threshold:
                return kind, self.where[kind][best], float(similarity[best])
        return None


def _conversations(spec: str) -> Iterator[tuple[str, str, str]]:
    """(where, last user turn, last answer) of every valid conversation row of a dataset."""
    from ..data.formats import DataReport, iter_samples
    from ..data.sources import iter_rows

    report = DataReport()
    for s in iter_samples(iter_rows(spec), "auto", "", True, report):
        if s.messages and len(s.messages) >= 2:
            yield s.where, s.messages[-2]["content"], s.messages[-1]["content"]


def build_reference(cfg: SynthConfig, failures: list[Failure]) -> tuple[NearDuplicates, dict[str, list]]:
    """The duplicate index over held-out and training rows (two passes over each file: lines
    counted, then rows signed), and up to two training rows per pattern to show the teacher."""
    sources = [("eval", s) for s in _existing(cfg.eval_dataset)] + [
        ("train", s) for s in _existing(cfg.dataset)
    ]
    counts: Counter[int] = Counter()
    rows = 0
    for _, spec in sources:
        for _, prompt, answer in _conversations(spec):
            rows += 1
            lines = {_norm(x) for x in (prompt + "\n" + answer).splitlines() if x.strip()}
            counts.update(_line_hash(x) for x in lines)
    common = max(3, int(rows * 0.02))  # a line in 2% of rows (and 3 at least) is template text
    index = NearDuplicates({h for h, n in counts.items() if n >= common}, cfg.near_duplicate)
    examples: dict[str, list] = {}
    for kind, spec in sources:
        for where, prompt, answer in _conversations(spec):
            index.add(kind, where, prompt, answer)
            for key in (pattern(prompt), "") if kind == "train" else ():
                shown = examples.setdefault(key, [])  # "": the first rows, for groups with no match
                if len(shown) < 2:
                    shown.append((prompt, answer))
    for f in failures:  # the failing rows are held-out rows too, whatever file they came from
        index.add("eval", f.where, f.prompt, f.reference)
    return index, examples


def _existing(spec: str) -> list[str]:
    return [spec] if spec else []


# ---------------------------------------------------------------------------------------------
# Asking the teacher


def _alpaca(prompt: str, answer: str) -> dict:
    instruction, _, extra = prompt.partition("\n\n")
    return {"instruction": instruction, "input": extra, "output": answer}


def request(group: Group, cfg: SynthConfig, examples: dict[str, list]) -> list[dict]:
    """The chat messages asking the teacher for K rows like the group's failures."""
    failing = [
        json.dumps({**_alpaca(f.prompt, f.reference), "student_answer": f.generation}, ensure_ascii=False)
        for f in group.rows[: cfg.context_rows]
    ]
    shown = examples.get(group.pattern) or examples.get("", [])
    training = [json.dumps(_alpaca(p, a), ensure_ascii=False) for p, a in shown]
    k = cfg.samples_per_group
    text = (
        "A student model answers prompts like these wrongly. Each line is a prompt (instruction and "
        "input), its correct output, and the student's wrong answer:\n"
        + "\n".join(failing)
        + ("\n\nRows of its training data, for the format:\n" + "\n".join(training) if training else "")
        + f"\n\nWrite {k} new training samples that teach this kind of prompt: the same task and answer "
        "format, different values, every output correct. Do not repeat any row above. TeacherReply with a JSON "
        f'array of {k} objects with the keys "instruction", "input" and "output", and nothing else.'
    )
    return [
        {
            "role": "system",
            "content": "You write training data for a small language model. You reply with JSON only.",
        },
        {"role": "user", "content": text},
    ]


def ask(
    teacher: Teacher, group: Group, messages: list[dict], cache: Path, budget_left: int, cfg
) -> TeacherReply | None:
    """The group's reply: the saved one if a run before paid for it, else a new request (saved
    at once). None when the token budget cannot pay for one more request."""
    saved = cache / f"{group.id}.json"
    if saved.is_file():
        try:
            return TeacherReply.from_json(json.loads(saved.read_text(encoding="utf-8"))["reply"])
        except (OSError, ValueError, KeyError, TypeError):
            saved.unlink()  # written atomically, so only a hand edit breaks it: ask again
    # Sent only when the budget pays for the prompt (3 characters a token: more tokens than most
    # tokenizers make of it) and the whole answer it allows.
    prompt_tokens = sum(len(m["content"]) for m in messages) // 3 + 1
    max_tokens = min(cfg.teacher_max_tokens, budget_left - prompt_tokens)
    if max_tokens < 64:
        return None
    reply = teacher.ask(messages, max_tokens)
    if reply.text is not None:  # paid for: never asked again
        atomic_write_json(saved, {"group": group.pattern, "request": messages, "reply": reply.to_json()})
    return reply


# ---------------------------------------------------------------------------------------------
# Checking rows


@dataclass
class GroupReport:
    id: str
    pattern: str
    failing_rows: int
    kinds: dict[str, int]
    asked: int = 0
    received: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    faults: list[str] = field(default_factory=list)
    status: str = "answered"


class Checker:
    def __init__(self, cfg: SynthConfig, index: NearDuplicates):
        self.cfg, self.index = cfg, index

    def __call__(self, item, where: str) -> tuple[dict | None, str, str]:
        """(the row to keep or None, reason, detail)."""
        from ..data.formats import to_sample

        if not isinstance(item, dict) or not all(
            isinstance(item.get(k, ""), str) for k in ("instruction", "input", "output")
        ):
            return None, "shape", "not an object of string instruction / input / output"
        if "instruction" not in item or "output" not in item:
            return None, "shape", f"missing key {'instruction' if 'instruction' not in item else 'output'}"
        row = {"instruction": item["instruction"], "input": item.get("input", ""), "output": item["output"]}
        try:
            sample = to_sample(row, "alpaca", where, "")
        except LorakitError as e:
            return None, "invalid", str(e)
        if sum(map(len, row.values())) > self.cfg.max_sample_chars:
            return None, "too_long", f"{sum(map(len, row.values()))} characters > --max_sample_chars"
        prompt, answer = sample.messages[-2]["content"], sample.messages[-1]["content"]
        dup = self.index.match(prompt, answer)
        if dup is not None:
            kind, other, similarity = dup
            return (
                None,
                f"duplicate_{kind}",
                f"{'same as' if similarity >= 1 else 'near'} {other} ({similarity:.2f})",
            )
        if self.cfg.verify:
            ok, detail = self.verify(row)
            if not ok:
                return None, "verify", detail
        self.index.add("synth", where, prompt, answer)
        return row, "", ""

    def verify(self, row: dict) -> tuple[bool, str]:
        try:
            proc = subprocess.run(
                shlex.split(self.cfg.verify),
                input=json.dumps(row, ensure_ascii=False),
                capture_output=True,
                text=True,
                timeout=self.cfg.verify_timeout,
            )
        except FileNotFoundError:
            raise LorakitError(f"--verify {self.cfg.verify!r}: command not found") from None
        except subprocess.TimeoutExpired:
            return False, f"verifier took over {self.cfg.verify_timeout:g} s"
        if proc.returncode == 0:
            return True, ""
        said = (proc.stderr or proc.stdout).strip().splitlines()
        return False, f"exit {proc.returncode}: {said[-1] if said else 'no message'}"[:300]


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class SynthResult:
    output_dir: Path
    kept: int
    tokens: int
    groups: list[GroupReport]
    report: dict


def synth(cfg: SynthConfig) -> Path:
    """`lorakit synth`: returns the output directory (synth.jsonl, rejected.jsonl, reports)."""
    return run_synth(cfg).output_dir


def run_synth(cfg: SynthConfig, deadline: float | None = None, tokens_before: int = 0) -> SynthResult:
    """Synth with the budgets of a larger loop: stop asking at `deadline` (time.time()), and
    count `tokens_before` (spent in earlier rounds) against --max_teacher_tokens."""
    cfg = _with_eval_defaults(cfg)
    teacher = Teacher(cfg)  # checks the teacher flags before any file is read
    if cfg.verify and not shlex.split(cfg.verify):
        raise LorakitError("--verify: empty command")
    failures = read_failures(cfg.failures)
    groups = group_failures(failures, cfg.max_groups)
    out = Path(cfg.output_dir).expanduser()
    cache = out / "teacher"
    cache.mkdir(parents=True, exist_ok=True)
    write_yaml(cfg, out)
    say(f"lorakit: synth: {len(failures)} failing rows in {len(groups)} groups (largest first)")
    index, examples = build_reference(cfg, failures)
    check = Checker(cfg, index)
    kept, rejected, reports = [], [], []
    spent = tokens_before
    for n, group in enumerate(groups, 1):
        gr = GroupReport(group.id, group.pattern, len(group.rows), group.kinds, cfg.samples_per_group)
        reports.append(gr)
        if deadline is not None and time.time() >= deadline and not (cache / f"{group.id}.json").is_file():
            gr.status, gr.asked = "skipped: time budget", 0
            continue
        reply = ask(teacher, group, request(group, cfg, examples), cache, cfg.max_teacher_tokens - spent, cfg)
        if reply is None:
            gr.status, gr.asked = "skipped: token budget", 0
            continue
        spent += reply.tokens
        gr.tokens, gr.faults = reply.tokens, list(reply.faults)
        _check_reply(reply, group, gr, check, kept, rejected)
        say(
            f"lorakit: synth: group {n}/{len(groups)} {group.pattern!r}: {gr.status}, asked {gr.asked}, "
            f"kept {gr.kept}, rejected {sum(gr.rejected.values())}, teacher tokens {gr.tokens} (total {spent - tokens_before})"
        )
    return _finish(cfg, out, groups, reports, kept, rejected, spent - tokens_before)


def _check_reply(
    reply: TeacherReply, group: Group, gr: GroupReport, check: Checker, kept: list, rejected: list
) -> None:
    if reply.text is None:
        gr.status = f"failed: {reply.faults[-1] if reply.faults else 'no answer'}"
        return
    items, fault = parse_samples(reply.text)
    if fault and not (fault == "refusal" and "refusal" in gr.faults):
        gr.faults.append(fault)
    gr.status = "answered" if not fault else f"answered ({fault})" if items else f"failed: {fault}"
    gr.received = len(items)
    for i, item in enumerate(items):
        where = f"teacher/{group.id}.json[{i}]"
        row, reason, detail = check(item, where)
        if row is None:
            gr.rejected[reason] = gr.rejected.get(reason, 0) + 1
            rejected.append(
                {"group": group.pattern, "where": where, "reason": reason, "detail": detail, "sample": item}
            )
        else:
            gr.kept += 1
            kept.append(row)


def _with_eval_defaults(cfg: SynthConfig) -> SynthConfig:
    """Held-out and training data default to what the eval beside the failures used."""
    if cfg.eval_dataset and cfg.dataset:
        return cfg
    path = Path(cfg.failures).expanduser()
    eval_json = (path if path.is_dir() else path.parent) / EVAL
    try:
        report = json.loads(eval_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return cfg
    changes = {}
    if not cfg.eval_dataset and report.get("dataset"):
        changes["eval_dataset"] = report["dataset"]
    if not cfg.dataset and report.get("adapter"):
        from ..data.sources import demo_path
        from ..models.adapter import Adapter

        try:
            trained = Adapter.open(report["adapter"], weights=False).settings.dataset
        except LorakitError:
            trained = None
        if trained is not None:
            changes["dataset"] = trained or str(demo_path("train"))
    return dataclasses.replace(cfg, **changes)


def _finish(cfg, out: Path, groups, reports: list[GroupReport], kept, rejected, tokens: int) -> SynthResult:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    atomic_write_text(out / "synth.jsonl", lines)
    atomic_write_text(
        out / "rejected.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected)
    )
    faults = Counter(f for g in reports for f in g.faults)
    reasons = sum((Counter(g.rejected) for g in reports), Counter())
    report = {
        "failures": cfg.failures,
        "eval_dataset": cfg.eval_dataset,
        "dataset": cfg.dataset,
        "teacher": {"url": cfg.teacher_url, "model": cfg.teacher_model},
        "groups": [dataclasses.asdict(g) for g in reports],
        "asked": sum(g.asked for g in reports),
        "received": sum(g.received for g in reports),
        "kept": len(kept),
        "rejected": dict(reasons),
        "teacher_faults": dict(faults),
        "teacher_tokens": tokens,
        "max_teacher_tokens": cfg.max_teacher_tokens,
    }
    atomic_write_json(out / "synth_report.json", report)
    atomic_write_text(out / "synth_report.md", markdown(report))
    say(
        f"lorakit: synth: kept {len(kept)} of {report['received']} rows from {len(reports)} groups, "
        f"teacher tokens {tokens}"
        + (f", teacher faults {dict(faults)}" if faults else "")
        + f"; wrote {out / 'synth.jsonl'} and {out / 'synth_report.md'}"
    )
    return SynthResult(out, len(kept), tokens, reports, report)


def group_table(groups: list[dict]) -> list[str]:
    lines = [
        "| group | failing rows | asked | received | kept | rejected | teacher tokens | teacher faults | status |",
        "|---|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for g in groups:
        rejected, faults = counts_text(g["rejected"], "-"), counts_text(Counter(g["faults"]), "-")
        pattern_cell = g["pattern"].replace("|", "\\|") or "(empty)"
        lines.append(
            f"| `{pattern_cell}` | {g['failing_rows']} | {g['asked']} | {g['received']} | {g['kept']} | "
            f"{rejected} | {g['tokens']} | {faults} | {g['status']} |"
        )
    return lines


def counts_text(counts: dict, empty: str = "none") -> str:
    """`{"timeout": 2, "429": 1}` as "429 1, timeout 2" (`empty` when there are none)."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or empty


def markdown(report: dict) -> str:
    faults, rejected = counts_text(report["teacher_faults"]), counts_text(report["rejected"])
    return "\n".join(
        [
            f"# Synthesised data from `{report['teacher']['model']}`",
            "",
            f"Failures: `{report['failures']}`; held-out rows guarded: `{report['eval_dataset'] or '-'}`; "
            f"training rows guarded: `{report['dataset'] or '-'}`.",
            "",
            *group_table(report["groups"]),
            "",
            f"Kept **{report['kept']}** of {report['received']} rows received ({report['asked']} asked). "
            f"Rejected: {rejected}. Teacher faults: {faults}. Teacher tokens: {report['teacher_tokens']} "
            f"(budget {report['max_teacher_tokens']}).",
            "",
        ]
    )
