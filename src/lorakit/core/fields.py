"""Config fields: a field's default, help, checks and policy written once (opt), and the same
fields as argparse flags and YAML keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LorakitError
from .runfiles import SETTINGS


@dataclass(frozen=True)
class Check:
    """The valid values of a field: a test and the words that describe them in an error."""

    test: Callable[[Any], bool]
    text: str

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except Exception:  # a value of the wrong type is outside every range
            return False


def at_least(n: float) -> Check:
    return Check(lambda v: v >= n, f">= {n:g}")


def above(n: float) -> Check:
    return Check(lambda v: v > n, f"> {n:g}")


def between(lo: float, hi: float, *, hi_open: bool = False, lo_open: bool = False) -> Check:
    def test(v):
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return Check(test, f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")


def _is_optimizer(name: str) -> bool:
    if name == "auto":
        return True
    from transformers.training_args import OptimizerNames  # only for a name other than auto

    return name in {o.value for o in OptimizerNames}


OPTIMIZER = Check(_is_optimizer, "auto or an optimizer name of transformers (TrainingArguments.optim)")
POSITIVE = at_least(1)
NON_NEGATIVE = at_least(0)
PORT = between(1, 65535)
NONEMPTY = Check(lambda v: len(v) > 0, "at least one value")


def memory_bytes(text: str) -> int | None:
    """A memory size as people write it (16GB, 24GiB, 16, 512MB) in bytes, or None. GPU memory is
    sold in binary gigabytes ("16 GB" cards have 16 GiB), so GB is read as GiB; no unit = GB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m)?\s*", text.lower())
    if not m:
        return None
    unit = m.group(2) or "gb"
    return int(float(m.group(1)) * (1024**3 if unit.startswith("g") else 1024**2))


SIZE = Check(lambda v: memory_bytes(v) is not None, "a size such as 16GB or 24GiB")
# What transformers' save_pretrained(max_shard_size=) reads: an integer and a unit.
SHARD_SIZE = Check(
    lambda v: bool(re.fullmatch(r"\s*[0-9]+\s*[kmg]i?b\s*", v.lower())), "a size such as 2GB or 500MB"
)
OPTIONAL_SIZE = Check(lambda v: v == "" or SIZE(v), "a size such as 16GB or 24GiB")


def opt(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    check: Check | None = None,
    resumable: bool = False,
    sweepable: bool = True,
    commas: bool = True,
) -> Any:
    """A config field: its default, its one-line docstring and, for strings, its allowed values.

    `check`: the valid values (numbers must also be finite), tested whenever a config is built.
    `resumable`: may differ between a checkpoint and its resume without changing the run's maths.
    `sweepable`: `lorakit sweep --param` may vary it.
    `commas`: a list field also takes `a,b` for `a b` (off where a value holds commas itself).
    """
    meta = {
        "help": help,
        "choices": choices,
        "check": check,
        "resumable": resumable,
        "sweepable": sweepable,
        "commas": commas,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def field_names(cls: type, **policy: bool) -> set[str]:
    """Names of the fields of `cls` whose metadata matches `policy` (e.g. resumable=True)."""
    return {
        f.name
        for f in dataclasses.fields(cls)
        if all(f.metadata.get(k, False) == v for k, v in policy.items())
    }


def as_config(cfg: Any, cls: type, **overrides: Any) -> Any:
    """A `cls` config holding the fields it shares with `cfg` (then `overrides`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k in names}
    return cls(**{**values, **overrides})


class CheckedConfig:
    """Every field's value is checked against its `check` (and choices) whenever a config is
    built: from flags, YAML or Python. Errors name the flag and the valid range."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_value(type(self), f.name, getattr(self, f.name), f"--{f.name}")


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def check_value(cls: type, name: str, value: Any, where: str) -> None:
    """Refuse a value outside the field's type, choices or range; `where` is a flag or file:line."""
    meta = _field(cls, name).metadata
    kind = _type_of(cls, name)
    shown = repr(value) if not isinstance(value, list) else ",".join(map(str, value)) or "''"
    if where.startswith("--"):
        head = f"{where} {shown}: must be"
    else:
        head = f"{where}: key '{name}' must be"
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise LorakitError(f"{head} a number")
    if kind is float and not math.isfinite(value):
        raise LorakitError(f"{head} a finite number")
    if meta.get("choices") and value not in meta["choices"]:
        raise LorakitError(f"{head} one of {', '.join(meta['choices'])}")
    check = meta.get("check")
    if check is not None and not check(value):
        noun = {int: "an integer ", float: "a number "}.get(kind, "")
        raise LorakitError(
            f"{head} {noun}{check.text}" + (f", got {shown}" if not where.startswith("--") else "")
        )


def same_as(cls: type, name: str) -> Any:
    """A field with the default, help and check of `cls`'s field `name` (each default once)."""
    f = _field(cls, name)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return opt(default, f.metadata["help"], choices=f.metadata["choices"], check=f.metadata["check"])


# ---------------------------------------------------------------------------------------------
# Fields -> argparse flags, YAML -> fields. Hand-written because the field is the single source
# of the default, help and type; argparse and PyYAML each only do their half.


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_of(cls: type, name: str) -> Any:
    """The field's type, with `X | None` read as X (None is its "not given" default)."""
    kind = _hints(cls)[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(kind) and len(args) == 1 else kind


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--name` flag per field of `cls`; flags not given stay absent from the namespace."""
    for f in dataclasses.fields(cls):
        kind = _type_of(cls, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = (
            ",".join(default) if isinstance(default, list) else "unset" if default is None else repr(default)
        )
        help_text = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            kwargs.update(nargs="+", metavar="VALUE", action="extend")  # repeated flags add up
        else:
            kwargs["type"] = kind
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{f.name}", **kwargs)


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """Check a YAML value against the field's type; YAML writes 2e-4 as a string, so parse numbers."""
    kind = _type_of(cls, name)
    bad = f"{where}: key '{name}' must be {getattr(kind, '__name__', str(kind))}, got {value!r}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise LorakitError(f"{bad} (write true or false)")
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise LorakitError(bad)
        if kind is int and isinstance(value, float):
            raise LorakitError(bad)
        try:
            return kind(value)
        except ValueError:
            raise LorakitError(bad) from None
    if typing.get_origin(kind) is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise LorakitError(f"{bad} (a list of names)")
        return split_list(cls, name, value)
    if value is None:
        return None if _field(cls, name).default is None else ""
    if not isinstance(value, str):
        raise LorakitError(f"{bad} (quote it)")
    choices = _field(cls, name).metadata.get("choices")
    if choices and value not in choices:
        raise LorakitError(f"{where}: key '{name}' must be one of {', '.join(choices)}, got {value!r}")
    return value


def form_value(cls: type, name: str, value: Any) -> Any:
    """A value typed into a form (numbers as text, lists as `a b` or `a,b`), read as YAML's would be."""
    if isinstance(value, str) and typing.get_origin(_type_of(cls, name)) is list:
        value = value.split()
    return _coerce(cls, name, value, f"field '{name}'")


def split_list(cls: type, name: str, values: list[str]) -> list[str]:
    """`a b`, `a,b` and `a, b` alike (for list fields whose values hold no commas themselves)."""
    if not _field(cls, name).metadata.get("commas", True):
        return list(values)
    return [part.strip() for v in values for part in v.split(",") if part.strip()]


def unknown_key_error(cls: type, key: str, where: str) -> LorakitError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
    return LorakitError(f"{where}: unknown key '{key}'{hint}")


def read_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a YAML config into checked field values; errors name the file, line and key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"config file not found: {path} (check the --config path)")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise LorakitError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise LorakitError(f"{path}:1: a config must be a mapping of key: value lines")
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key_node, value_node in root.value:
        key, where = key_node.value, f"{path}:{key_node.start_mark.line + 1}"
        if key not in names:
            raise unknown_key_error(cls, key, where)
        value = yaml.safe_load(yaml.serialize(value_node))
        values[key] = _coerce(cls, key, value, where)
        check_value(cls, key, values[key], where)
    return values


def resolve(
    cls: type, flags: dict[str, Any] | None = None, config_file: str | None = None, base: dict | None = None
):
    """defaults < base (e.g. the demo's settings) < YAML file < flags."""
    values: dict[str, Any] = dict(base or {})
    if config_file:
        values.update(read_yaml(config_file, cls))
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in (flags or {}).items():
        if key not in names:
            raise unknown_key_error(cls, key, "argument")
        if isinstance(value, list):
            value = split_list(cls, key, value)
        check_value(cls, key, value, f"--{key}")
        values[key] = value
    return cls(**values)


def to_yaml(cfg: Any) -> str:
    import yaml

    header = "# Resolved lorakit configuration: repeat this run with `lorakit train --config lorakit.yaml`.\n"
    return header + yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)


def write_yaml(cfg: Any, directory: str | Path, name: str = SETTINGS) -> Path:
    from .files import atomic_write_text

    return atomic_write_text(Path(directory) / name, to_yaml(cfg))
