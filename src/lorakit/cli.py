"""Command line: a table of commands, each with its config class, its entry point and its help.

Flags are generated from the config dataclasses; the entry point is named as "module:function"
and imported only when its command runs, so `--help` answers without importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import __version__
from .core.config import (
    ChatConfig,
    DashboardConfig,
    DataCacheConfig,
    DataCheckConfig,
    DataConvertConfig,
    DemoConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    ImproveConfig,
    MergeConfig,
    PlanConfig,
    ServeConfig,
    SweepConfig,
    SynthConfig,
    TrainConfig,
)
from .core.errors import LorakitError
from .core.fields import add_arguments, resolve


@dataclass(frozen=True)
class Command:
    name: str  # "train", or "group action" for a subcommand ("export gguf")
    config: type | None
    entry: str  # "module:function" inside lorakit, called as function(cfg, **extra)
    help: str
    positional: tuple[tuple[str, dict], ...] = ()  # argparse positionals passed on to the entry
    defaults: str = ""  # "module:function" giving settings that replace the field defaults
    wants_argv: bool = False  # the entry also gets the command line (to re-launch itself)


COMMANDS = (
    Command(
        "train",
        TrainConfig,
        "training.launch:train_command",
        "Train a LoRA adapter on a JSONL dataset.",
        wants_argv=True,
    ),
    Command(
        "generate",
        GenerateConfig,
        "inference.generate:generate_command",
        "Answer a prompt with a base model, optionally with an adapter (greedy unless --temperature > 0).",
        (("prompt", {"help": "the user message"}),),
    ),
    Command(
        "plan",
        PlanConfig,
        "planning.plan:plan",
        "Plan memory and speed of a training run (same flags as train), or --fit it to a GPU.",
    ),
    Command(
        "eval",
        EvalConfig,
        "workflows.evaluate:evaluate",
        "Evaluate an adapter (or merged model) on held-out rows: loss, scores, stop rate, failures.",
    ),
    Command(
        "chat",
        ChatConfig,
        "inference.chat:chat",
        "Chat with a model (and adapter) in the terminal: /reset, /system TEXT, /exit.",
    ),
    Command(
        "serve",
        ServeConfig,
        "inference.serve:serve",
        "OpenAI-compatible HTTP server for local use (chat/completions, completions, models).",
    ),
    Command(
        "dashboard",
        DashboardConfig,
        "ui.dashboard:dashboard",
        "Local web page: runs and their live curves, comparisons, eval and data reports, chat, new runs.",
    ),
    Command(
        "synth",
        SynthConfig,
        "workflows.synth:synth",
        "New training rows for eval failures from a teacher model (OpenAI-compatible), each one checked.",
    ),
    Command(
        "improve",
        ImproveConfig,
        "workflows.improve:improve",
        "Rounds of eval -> synth -> retrain -> eval on the same held-out rows, until no gain.",
    ),
    Command(
        "sweep",
        SweepConfig,
        "workflows.sweep:sweep",
        "Hyperparameter sweep (grid, successive halving or Optuna) ranked by validation loss.",
    ),
    Command(
        "merge",
        MergeConfig,
        "export.merge:merge",
        "Merge a LoRA adapter into its (de-quantized) base and verify the logits.",
    ),
    Command(
        "export gguf",
        ExportConfig,
        "export.targets:export_gguf",
        "Merged model (and LoRA adapter) as GGUF for llama.cpp / Ollama.",
    ),
    Command(
        "export ollama",
        ExportConfig,
        "export.targets:export_ollama",
        "A Modelfile with the training chat template, stop tokens and sampling defaults.",
    ),
    Command(
        "export vllm",
        ExportConfig,
        "export.targets:export_vllm",
        "The `vllm serve` command for the merged model or base + adapter.",
    ),
    Command(
        "export all",
        ExportConfig,
        "export.targets:export_all",
        "Merge, then GGUF, Ollama and vLLM exports into one folder with a README.",
    ),
    Command("models", None, "cli:print_models", "List the models usable offline and where they are cached."),
    Command(
        "data check",
        DataCheckConfig,
        "data.doctor:check",
        "Validate and tokenize a dataset as training would; report what it found.",
        (("dataset", {"nargs": "?", "metavar": "DATASET", "help": "same as --dataset"}),),
    ),
    Command(
        "data convert",
        DataConvertConfig,
        "data.doctor:convert",
        "Write any accepted format as normalised messages-JSONL.",
        (("dataset", {"nargs": "?", "metavar": "DATASET", "help": "same as --dataset"}),),
    ),
    Command(
        "data cache",
        DataCacheConfig,
        "data.cache:data_cache",
        "List the cached encoded datasets (reused by train, resume, sweep, plan, check), or --clear them.",
    ),
    Command(
        "demo",
        DemoConfig,
        "workflows.demo:demo",
        "Train the embedded default on the demo data and compare answers before and after.",
        defaults="workflows.demo:demo_settings",
    ),
)
GROUPS = {"export": "Export to GGUF, Ollama or vLLM.", "data": "Check or convert a dataset."}


class Parser(argparse.ArgumentParser):
    """argparse with lorakit's one-line errors (argparse prints the whole usage first)."""

    def error(self, message: str):
        where = self.prog.removeprefix("lorakit").strip()  # "train", "export gguf", or "" at the top
        self.exit(2, f"lorakit: error: {where + ': ' if where else ''}{message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="lorakit", description="JSONL instruction samples -> a fine-tuned LLM with LoRA / QLoRA.")
    p.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, Any] = {}
    for command in COMMANDS:
        group, _, action = command.name.rpartition(" ")
        where = sub
        if group:
            if group not in groups:
                g = sub.add_parser(group, help=GROUPS[group], description=GROUPS[group])
                groups[group] = g.add_subparsers(dest="action", metavar="ACTION", required=True)
            where = groups[group]
        sp = where.add_parser(
            action, help=command.help, description=command.help, argument_default=argparse.SUPPRESS
        )
        sp.set_defaults(lorakit_command=command)
        for name, kwargs in command.positional:
            sp.add_argument(
                f"{name}_arg" if command.config and name in _fields(command.config) else name, **kwargs
            )
        if command.config is not None:
            sp.add_argument(
                "--config", metavar="YAML", help="YAML file with the same keys as the flags (flags win)"
            )
            add_arguments(sp, command.config)
    return p


def _fields(cls: type) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)}


def _load(spec: str) -> Callable:
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(f"lorakit.{module}"), function)


def quiet_libraries() -> None:
    """lorakit prints its own progress (data, steps, files written): the libraries' per-stage bars
    ("Loading weights", "Writing model shards", "Map") and their notices of their own deprecations
    are noise to a user. The bars are switched off through the variables the libraries read when
    imported (a user's own setting wins); a deprecation lorakit's code itself triggers still shows."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' own bars
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"^(?!lorakit)")
    # bitsandbytes warns on import that an optional hub-downloaded CPU kernel is missing; the
    # built-in CPU path it falls back to is the one lorakit uses.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = _parser()
    args = vars(parser.parse_args(argv))
    command: Command | None = args.pop("lorakit_command", None)
    if command is None:
        parser.print_help()
        return 2
    for key in ("command", "action"):
        args.pop(key, None)
    config_file = args.pop("config", None)
    extra = {}
    for name, _ in command.positional:
        if command.config and name in _fields(command.config):  # a positional form of a flag
            value = args.pop(f"{name}_arg", None)
            if value is not None:
                args[name] = value
        else:
            extra[name] = args.pop(name)
    if command.wants_argv:
        extra["argv"] = list(argv if argv is not None else sys.argv[1:])
    try:
        if command.config is None:
            _load(command.entry)()
            return 0
        base = _load(command.defaults)() if command.defaults else None
        cfg = resolve(command.config, args, config_file, base=base)
        result = _load(command.entry)(cfg, **extra)
    except LorakitError as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def print_models() -> None:
    from rich.console import Console
    from rich.table import Table

    from .models.loading import cached_models, lorakit_home

    table = Table(title=f"Models usable offline (LORAKIT_HOME={lorakit_home()})")
    for col in ("name", "kind", "source", "cache"):
        table.add_column(col, overflow="fold")
    for row in cached_models():
        table.add_row(row["name"], row["kind"], row["path"], row["cache"])
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
