"""Command line: parses flags generated from the config dataclasses and calls the Python API.

Heavy libraries (torch, transformers) are imported inside the stage functions, so `--help`
answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .config import (
    ChatConfig,
    DataCheckConfig,
    DataConvertConfig,
    DemoConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    MergeConfig,
    PlanConfig,
    ServeConfig,
    SweepConfig,
    TrainConfig,
    add_arguments,
    resolve,
)
from .errors import LorakitError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorakit", description="JSONL instruction samples -> a fine-tuned LLM with LoRA / QLoRA."
    )
    p.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, cls: type | None, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, argument_default=argparse.SUPPRESS)
        if cls is not None:
            sp.add_argument(
                "--config", metavar="YAML", help="YAML file with the same keys as the flags (flags win)"
            )
            add_arguments(sp, cls)
        return sp

    command("train", TrainConfig, "Train a LoRA adapter on a JSONL dataset.")
    g = command("generate", GenerateConfig, "Answer a prompt with a base model, optionally with an adapter.")
    g.add_argument("prompt", help="the user message")
    command(
        "plan",
        PlanConfig,
        "Plan memory and speed of a training run (same flags as train), or --fit it to a GPU.",
    )
    command(
        "eval",
        EvalConfig,
        "Evaluate an adapter (or merged model) on held-out rows: loss, scores, stop rate, failures.",
    )
    command(
        "chat", ChatConfig, "Chat with a model (and adapter) in the terminal: /reset, /system TEXT, /exit."
    )
    command(
        "serve",
        ServeConfig,
        "OpenAI-compatible HTTP server for local use (chat/completions, completions, models).",
    )
    command(
        "sweep",
        SweepConfig,
        "Hyperparameter sweep (grid, successive halving or Optuna) ranked by validation loss.",
    )
    command("merge", MergeConfig, "Merge a LoRA adapter into its (de-quantized) base and verify the logits.")
    export = sub.add_parser(
        "export", help="Export to GGUF, Ollama or vLLM.", description="Export to GGUF, Ollama or vLLM."
    )
    export_sub = export.add_subparsers(dest="export_kind", metavar="TARGET", required=True)
    for name, text in (
        ("gguf", "Merged model (and LoRA adapter) as GGUF for llama.cpp / Ollama."),
        ("ollama", "A Modelfile with the training chat template, stop tokens and sampling defaults."),
        ("vllm", "The `vllm serve` command for the merged model or base + adapter."),
        ("all", "Merge, then GGUF, Ollama and vLLM exports into one folder with a README."),
    ):
        sp = export_sub.add_parser(name, help=text, description=text, argument_default=argparse.SUPPRESS)
        sp.add_argument(
            "--config", metavar="YAML", help="YAML file with the same keys as the flags (flags win)"
        )
        add_arguments(sp, ExportConfig)
    command("models", None, "List the models usable offline and where they are cached.")
    data = sub.add_parser(
        "data", help="Check or convert a dataset.", description="Check or convert a dataset."
    )
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    for name, cls, text in (
        (
            "check",
            DataCheckConfig,
            "Validate and tokenize a dataset as training would; report what it found.",
        ),
        ("convert", DataConvertConfig, "Write any accepted format as normalised messages-JSONL."),
    ):
        sp = data_sub.add_parser(name, help=text, description=text, argument_default=argparse.SUPPRESS)
        sp.add_argument("dataset_path", nargs="?", metavar="DATASET", help="same as --dataset")
        sp.add_argument(
            "--config", metavar="YAML", help="YAML file with the same keys as the flags (flags win)"
        )
        add_arguments(sp, cls)
    command(
        "demo",
        DemoConfig,
        "Train the embedded default on the demo data and compare answers before and after.",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    # bitsandbytes warns on import that an optional hub-downloaded CPU kernel is missing; the
    # built-in CPU path it falls back to is the one lorakit uses.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    parser = _parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command", None)
    if command is None:
        parser.print_help()
        return 2
    config_file = args.pop("config", None)
    try:
        if command == "train":
            cfg = resolve(TrainConfig, args, config_file)
            from .launch import launch, under_launcher

            if cfg.num_processes > 1 and not under_launcher():
                return launch(cfg, list(argv if argv is not None else sys.argv[1:]))
            from .train import train

            train(cfg)
        elif command == "generate":
            from .generate import generate

            prompt = args.pop("prompt")
            print(generate(resolve(GenerateConfig, args, config_file), prompt))
        elif command == "sweep":
            from .sweep import sweep

            sweep(resolve(SweepConfig, args, config_file))
        elif command == "eval":
            from .evaluate import evaluate

            evaluate(resolve(EvalConfig, args, config_file))
        elif command == "chat":
            from .chat import chat

            chat(resolve(ChatConfig, args, config_file))
        elif command == "serve":
            from .serve import serve

            serve(resolve(ServeConfig, args, config_file))
        elif command == "merge":
            from .merge import merge

            merge(resolve(MergeConfig, args, config_file))
        elif command == "export":
            from .export import export

            kind = args.pop("export_kind")
            export(kind, resolve(ExportConfig, args, config_file))
        elif command == "plan":
            from .plan import plan

            plan(resolve(PlanConfig, args, config_file))
        elif command == "data":
            from .doctor import check, convert

            action = args.pop("data_command")
            if args.get("dataset_path"):
                args["dataset"] = args.pop("dataset_path")
            args.pop("dataset_path", None)
            if action == "check":
                check(resolve(DataCheckConfig, args, config_file))
            else:
                convert(resolve(DataConvertConfig, args, config_file))
        elif command == "models":
            _print_models()
        elif command == "demo":
            from .demo import demo, demo_settings

            demo(resolve(DemoConfig, args, config_file, base=demo_settings()))
    except LorakitError as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    return 0


def _print_models() -> None:
    from rich.console import Console
    from rich.table import Table

    from .models import cached_models, lorakit_home

    table = Table(title=f"Models usable offline (LORAKIT_HOME={lorakit_home()})")
    for col in ("name", "kind", "source", "cache"):
        table.add_column(col, overflow="fold")
    for row in cached_models():
        table.add_row(row["name"], row["kind"], row["path"], row["cache"])
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
