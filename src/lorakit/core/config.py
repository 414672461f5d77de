"""Every setting of every command, each default once: dataclass fields = CLI flags = YAML keys."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import LorakitError
from .fields import (
    NON_NEGATIVE,
    NONEMPTY,
    OPTIMIZER,
    OPTIONAL_SIZE,
    PORT,
    POSITIVE,
    SHARD_SIZE,
    Check,
    CheckedConfig,
    above,
    between,
    opt,
    same_as,
)

# The guide's seven projections: attention (q/k/v/o) and the MLP (gate/up/down).
GUIDE_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def size_band(n_rows: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(rank range, epoch range) the guide recommends for a dataset of `n_rows` rows."""
    if n_rows < 1000:
        return (8, 16), (5, 10)
    if n_rows <= 10000:
        return (32, 64), (3, 5)
    return (128, 256), (1, 3)


@dataclass
class ModelArgs(CheckedConfig):
    base_model: str = opt(
        "",
        "Hub id, local HF model directory or .gguf file ('' = the embedded SmolLM2-135M-Instruct).",
        resumable=True,  # a resume checks the base by content (training/checkpoints.py), not by path
        sweepable=False,
    )
    trust_remote_code: bool = opt(
        False, "Allow model code from the hub repository to run (only for ids you trust)."
    )


@dataclass
class PromptArgs(CheckedConfig):
    system_prompt: str | None = opt(
        None,
        "System message before every conversation; a row's own system field wins. Unset: none in "
        "training, the adapter's own at inference; '' = none.",
    )


@dataclass
class DataArgs(CheckedConfig):
    dataset: str = opt(
        "",
        "JSONL/JSON file, directory, glob or HF datasets id ('' = the bundled demo data).",
        resumable=True,
        sweepable=False,
    )
    dataset_format: str = opt(
        "auto",
        "Row format; auto detects it from each row's keys.",
        choices=("auto", "alpaca", "chat", "sharegpt", "completion", "text"),
    )
    max_seq_length: int = opt(
        1024, "Longest training row in tokens; longer rows are handled by --overlength.", check=POSITIVE
    )
    overlength: str = opt(
        "drop", "What to do with rows longer than max_seq_length.", choices=("drop", "truncate", "error")
    )
    train_on: str = opt(
        "all_assistant",
        "Which assistant turns of a multi-turn conversation carry the loss.",
        choices=("all_assistant", "last_assistant"),
    )
    skip_bad_rows: bool = opt(
        False, "Skip (and list) invalid rows instead of failing on the first one.", resumable=True
    )
    val_size: float = opt(
        0.0,
        "Validation split taken from the data: a fraction (< 1) or a row count (>= 1); 0 = none.",
        sweepable=False,
        check=NON_NEGATIVE,
    )
    val_dataset: str = opt(
        "",
        "Separate validation data (same forms as --dataset); overrides val_size.",
        resumable=True,
        sweepable=False,
    )
    seed: int = opt(
        42,
        "Random seed for the validation split, the data order and LoRA initialisation.",
        check=NON_NEGATIVE,
    )


@dataclass
class TrainConfig(ModelArgs, DataArgs, PromptArgs):
    output_dir: str = opt(
        "outputs/lorakit-run",
        "Directory for the adapter, tokenizer, lorakit.yaml, metrics.jsonl and TensorBoard runs/.",
        resumable=True,
        sweepable=False,
    )
    overwrite: bool = opt(
        False,
        "Replace an adapter already in output_dir instead of refusing.",
        resumable=True,
        sweepable=False,
    )
    lora_r: int = opt(
        64, "LoRA rank: the inner dimension of the A (r x d_in) and B (d_out x r) matrices.", check=POSITIVE
    )
    lora_alpha: float = opt(
        128, "LoRA scaling numerator: the update is scaled by lora_alpha / lora_r.", check=above(0)
    )
    lora_dropout: float = opt(
        0.05, "Dropout on the LoRA branch input (0 is ~13% faster on CPU).", check=between(0, 1, hi_open=True)
    )
    target_modules: list[str] = opt(
        GUIDE_TARGET_MODULES,
        "Module names to adapt, or 'all-linear' for every linear layer but the output head.",
        check=NONEMPTY,
    )
    modules_to_save: list[str] = opt(
        [],
        "Modules trained in full and saved with the adapter (e.g. lm_head embed_tokens after adding tokens).",
    )
    use_rslora: bool = opt(
        False, "Rank-stabilised LoRA: scale by lora_alpha / sqrt(lora_r) instead of / lora_r."
    )
    use_dora: bool = opt(False, "DoRA: learn a magnitude vector beside the LoRA direction (slower).")
    load_in_4bit: bool = opt(False, "QLoRA: load the frozen base in 4-bit through bitsandbytes.")
    load_in_8bit: bool = opt(False, "Load the frozen base in 8-bit through bitsandbytes.")
    bnb_4bit_quant_type: str = opt("nf4", "4-bit data type.", choices=("nf4", "fp4"))
    bnb_4bit_use_double_quant: bool = opt(
        True, "Also quantize the 4-bit quantization constants (~0.4 bit/param)."
    )
    bnb_4bit_compute_dtype: str = opt(
        "auto",
        "Dtype of the 4-bit matmuls (auto: bf16 where supported, else fp16 on GPU, fp32 on CPU).",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    batch_size: int = opt(
        4, "Rows per device per forward pass (micro-batch).", resumable=True, check=POSITIVE
    )
    gradient_accumulation_steps: int = opt(
        4,
        "Micro-batches per optimizer step (effective batch = batch_size x this).",
        resumable=True,
        check=POSITIVE,
    )
    learning_rate: float = opt(2e-4, "Peak AdamW learning rate.", check=above(0))
    num_epochs: float = opt(
        3.0, "Passes over the training data (ignored when max_steps > 0).", check=NON_NEGATIVE
    )
    max_steps: int = opt(
        0, "Stop after this many optimizer steps (0 = train for num_epochs).", check=NON_NEGATIVE
    )
    warmup_steps: int = opt(
        100,
        "Linear learning-rate warmup steps (capped at 10% of the run when larger than the run).",
        check=NON_NEGATIVE,
    )
    weight_decay: float = opt(0.01, "AdamW weight decay.", check=NON_NEGATIVE)
    lr_scheduler_type: str = opt(
        "cosine", "Learning-rate schedule after warmup.", choices=("cosine", "linear", "constant_with_warmup")
    )
    max_grad_norm: float = opt(1.0, "Gradient clipping by global norm (0 = off).", check=NON_NEGATIVE)
    optim: str = opt(
        "auto",
        "Optimizer, by transformers' name (e.g. paged_adamw_8bit for QLoRA, adamw_torch_fused); "
        "auto = fused AdamW on a CUDA GPU, adamw_torch elsewhere.",
        check=OPTIMIZER,
    )
    report_to: list[str] = opt(
        ["tensorboard"],
        "Where metrics go besides metrics.jsonl: tensorboard, wandb, mlflow, trackio, ... or none.",
        check=Check(
            lambda v: len(v) > 0 and ("none" not in v or len(v) == 1), "one or more trackers, or none alone"
        ),
        resumable=True,
        sweepable=False,
    )
    run_name: str = opt(
        "",
        "The run's name in the trackers (default: the output directory's name).",
        resumable=True,
        sweepable=False,
    )
    fp16: bool = opt(False, "fp16 mixed precision (CUDA GPUs only).")
    bf16: bool = opt(False, "bf16 mixed precision (Ampere+ GPUs, or CPUs with bf16 support).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward: less memory, ~30% slower.")
    group_by_length: bool = opt(
        True, "Batch rows of similar length together so little compute is spent on padding."
    )
    early_stopping_patience: int = opt(
        0,
        "Stop after this many evaluations without a lower validation loss; restore the best (0 = off).",
        check=NON_NEGATIVE,
    )
    save_steps: int = opt(
        100,
        "Write a resumable checkpoint every this many steps (early stopping: every eval).",
        resumable=True,
        sweepable=False,
        check=POSITIVE,
    )
    save_total_limit: int = opt(
        3,
        "Keep only the newest this many checkpoints (and the best one); 0 = keep all.",
        resumable=True,
        check=NON_NEGATIVE,
    )
    resume: bool = opt(
        False, "Continue from the newest complete checkpoint in output_dir.", resumable=True, sweepable=False
    )
    resume_from_checkpoint: str = opt(
        "", "Continue from this checkpoint directory.", resumable=True, sweepable=False
    )
    resume_ignore_changes: bool = opt(
        False,
        "Resume even if the data, chat template or settings differ from the checkpoint's.",
        resumable=True,
        sweepable=False,
    )
    auto_batch_size: bool = opt(
        True,
        "On out-of-memory: halve batch_size, double gradient_accumulation_steps, continue from the last step.",
        resumable=True,
    )
    max_nonfinite_steps: int = opt(
        3,
        "Stop after this many consecutive steps with a NaN/inf loss or gradient (each one is skipped).",
        resumable=True,
        check=POSITIVE,
    )
    no_progress_steps: int = opt(
        100,
        "Warn when the training loss has not fallen after this many optimizer steps (0 = never).",
        resumable=True,
        check=NON_NEGATIVE,
    )
    chunked_loss: bool = opt(
        True,
        "Loss on supervised positions only, in chunks: no full [tokens, vocab] logits (same value).",
        resumable=True,
    )
    padding_free: bool = opt(
        False,
        "Pack each micro-batch into one row with per-row positions (no padding; fastest with flash-attention on GPU).",
        resumable=True,
    )
    attn_implementation: str = opt(
        "auto",
        "Attention kernel. auto: flash_attention_2 on a CUDA GPU where flash-attn is installed (rows then "
        "packed, as --padding_free), else sdpa; on a CPU eager up to 512-token rows (faster than SDPA there), else sdpa.",
        choices=("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3"),
        resumable=True,
    )
    max_tokens_per_batch: int = opt(
        0,
        "Cut each optimizer step's rows into micro-batches of at most this many (padded) tokens "
        "instead of batch_size rows: fewer, larger matrix products; the step and its loss are unchanged (0 = off).",
        resumable=True,
        check=NON_NEGATIVE,
    )
    regroup_micro_batches: bool = opt(
        True,
        "Cut each optimizer step's rows into micro-batches by padded size instead of batch_size rows in "
        "order: none larger than batch_size x the step's longest row (the same peak memory), less padding; the "
        "step and its loss are unchanged. Used with one process and --chunked_loss, on padded rows (packed: with "
        "flash-attention only).",
        resumable=True,
    )
    torch_compile: bool = opt(
        False,
        "Compile the model with torch.compile (slow first steps, recompiles for new shapes).",
        resumable=True,
    )
    use_liger_kernel: bool = opt(
        False,
        "Use Liger's fused GPU kernels (pip install liger-kernel; replaces --chunked_loss).",
        resumable=True,
    )
    num_processes: int = opt(
        1,
        "Launch this many processes through `accelerate launch` (one per GPU; gloo on CPU).",
        check=POSITIVE,
    )
    distributed: str = opt(
        "ddp",
        "Multi-process engine: the accelerate config shipped for it.",
        choices=("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"),
    )
    eval_steps: int = opt(
        0,
        "With validation data: evaluate its loss every this many steps (0 = at each epoch's end).",
        sweepable=False,
        check=NON_NEGATIVE,
    )
    logging_steps: int = opt(
        5,
        "Log train loss, learning rate and throughput every this many optimizer steps.",
        resumable=True,
        sweepable=False,
        check=POSITIVE,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # Checks that need no hardware: plan, sweep and train refuse the same combinations.
        if self.fp16 and self.bf16:
            raise LorakitError("--fp16 and --bf16 are exclusive: pick one")
        if self.load_in_4bit and self.load_in_8bit:
            raise LorakitError("--load_in_4bit and --load_in_8bit are exclusive: pick one")
        if self.max_steps == 0 and self.num_epochs <= 0:  # a run of no step would look like a result
            raise LorakitError(f"--num_epochs {self.num_epochs:g}: must be > 0 (or give --max_steps)")
        if self.max_tokens_per_batch and self.num_processes > 1 and self.distributed.startswith("deepspeed"):
            raise LorakitError(
                "--max_tokens_per_batch cannot be used with --distributed deepspeed_*: DeepSpeed steps its "
                "own gradient accumulation; use ddp or fsdp, or drop --max_tokens_per_batch"
            )

    @property
    def precision(self) -> str:
        """The mixed-precision mode the flags ask for: fp16, bf16 or fp32 (none)."""
        return "fp16" if self.fp16 else "bf16" if self.bf16 else "fp32"

    def micro_batch_rows(self, length: int) -> int:
        """Rows of `length` tokens in one micro-batch (--max_tokens_per_batch: as many as fit)."""
        if not self.max_tokens_per_batch:
            return self.batch_size
        step_rows = self.batch_size * self.gradient_accumulation_steps
        return max(1, min(step_rows, self.max_tokens_per_batch // max(length, 1)))

    def steps_per_epoch(self, n_rows: int) -> int:
        """Optimizer steps in one pass over `n_rows` training rows."""
        micro_batches = math.ceil(n_rows / self.batch_size)
        return max(1, math.ceil(micro_batches / self.gradient_accumulation_steps))

    def total_steps(self, n_rows: int) -> int:
        """Optimizer steps of the whole run: max_steps, or num_epochs passes over `n_rows` rows."""
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.steps_per_epoch(n_rows) * self.num_epochs))


@dataclass
class PlanConfig(TrainConfig):
    gpu: str = opt(
        "", "GPU to plan for by name (see `lorakit plan --list_gpus`), e.g. rtx4070tisuper, a100-80, h100."
    )
    gpu_memory: str = opt(
        "", "GPU memory budget, e.g. 16GB or 24GiB (overrides --gpu's memory).", check=OPTIONAL_SIZE
    )
    fit: bool = opt(
        False, "Search rank, micro-batch, length, checkpointing and 8/4-bit for the fastest run that fits."
    )
    utilization: float = opt(
        0.35,
        "Assumed fraction of the GPU's peak bf16 FLOP/s reached in training (for time estimates).",
        check=between(0, 1, lo_open=True),
    )
    list_gpus: bool = opt(False, "List the known GPUs and exit.")
    num_gpus: int = opt(
        1,
        "GPUs the run is spread over (with --distributed: how weights, gradients and optimizer are sharded).",
        check=POSITIVE,
    )


@dataclass
class SweepConfig(TrainConfig):
    param: list[str] = opt(
        [],
        "Values to try, as NAME=V1,V2,... (repeat for several settings; none: the guide's defaults).",
        commas=False,
    )
    strategy: str = opt(
        "grid",
        "grid: every combination; halving: successive halving; optuna: TPE sampler with pruning.",
        choices=("grid", "halving", "optuna"),
    )
    budget_steps: int = opt(
        0,
        "Optimizer steps per trial (halving: of the last rung; 0 = num_epochs / max_steps).",
        check=NON_NEGATIVE,
    )
    budget_minutes: float = opt(
        0.0, "Stop starting new trials after this many minutes (0 = no limit).", check=NON_NEGATIVE
    )
    n_trials: int = opt(8, "Trials for --strategy optuna.", check=POSITIVE)
    halving_rungs: int = opt(
        3, "Rungs of successive halving (steps double and configurations halve at each).", check=POSITIVE
    )
    gpu_memory: str = opt(
        "",
        "Skip configurations the planner says will not fit this memory (default: the GPU's, if any).",
        check=OPTIONAL_SIZE,
    )
    train_best: bool = opt(
        False, "After the sweep, train the best configuration in full (num_epochs, not the budget)."
    )


@dataclass
class DataCheckConfig(ModelArgs, DataArgs, PromptArgs):
    preview: int = opt(
        3, "Rendered rows to show with their supervised tokens highlighted.", check=NON_NEGATIVE
    )
    plot: str = opt("", "Write a PNG histogram of token lengths to this path.")
    output: str = opt("", "Write the full report as JSON to this path.")


@dataclass
class DataConvertConfig(DataArgs, PromptArgs):
    output: str = opt("", "Normalised messages-JSONL to write (required).")


@dataclass
class DataCacheConfig(CheckedConfig):
    clear: bool = opt(False, "Remove every cached encoding (they are made again when needed).")


@dataclass
class SamplingArgs(CheckedConfig):
    """How a served model samples unless a request says otherwise: the guide's serving values, one
    default for `serve` and the exported Modelfile (`generate` and `chat` are greedy: GreedyArgs)."""

    temperature: float = opt(
        0.3, "Sampling temperature (0 = greedy decoding; the guide's serving value).", check=between(0, 2)
    )
    top_p: float = opt(
        0.9, "Nucleus sampling mass (used when temperature > 0).", check=between(0, 1, lo_open=True)
    )
    top_k: int = opt(
        40, "Sample from the k most likely tokens (used when temperature > 0).", check=NON_NEGATIVE
    )


@dataclass
class GreedyArgs(SamplingArgs):
    temperature: float = opt(
        0.0,
        "Sampling temperature; 0 = greedy decoding, so the same prompt gives the same answer.",
        check=between(0, 2),
    )


@dataclass
class AdapterArgs(CheckedConfig):
    adapter: str = opt(
        "", "Adapter directory written by `lorakit train` (its base and chat template are used)."
    )


@dataclass
class GenerateConfig(ModelArgs, PromptArgs, GreedyArgs, AdapterArgs):
    max_new_tokens: int = opt(256, "Most tokens to generate.", check=POSITIVE)


@dataclass
class MergeConfig(ModelArgs, AdapterArgs):
    output_dir: str = opt(
        "outputs/merged", "Directory for the merged model (safetensors shards, tokenizer, generation config)."
    )
    overwrite: bool = opt(False, "Replace a non-empty output_dir.")
    dtype: str = opt(
        "auto",
        "Dtype of the merged weights (auto: the training dtype, bf16 for a quantized base).",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    max_shard_size: str = opt("2GB", "Largest safetensors shard.", check=SHARD_SIZE)


@dataclass
class ExportConfig(MergeConfig, SamplingArgs):
    model: str = opt("", "An already merged model directory (instead of --adapter).")
    output_dir: str = opt("outputs/export", "Directory for the exported files.")
    quant: str = opt("f16", "GGUF tensor type of the weights.", choices=("f32", "f16", "bf16", "q8_0"))
    ollama_from: str = opt(
        "gguf",
        "What the Modelfile's FROM uses: the GGUF file, the merged directory, or the base plus a GGUF LoRA ADAPTER.",
        choices=("gguf", "merged", "adapter"),
    )
    system: str = opt("", "SYSTEM of the Modelfile ('' = the system prompt the adapter was trained with).")
    ollama_name: str = opt("lorakit-model", "Model name in the printed `ollama create` command.")
    port: int = opt(8000, "Port in the printed `vllm serve` command.", check=PORT)
    llama_cpp_dir: str = opt(
        "",
        "A llama.cpp source tree whose convert_hf_to_gguf.py / convert_lora_to_gguf.py write the GGUF files "
        "of architectures lorakit has no writer for ('' = $LORAKIT_LLAMA_CPP).",
    )


@dataclass
class EvalConfig(ModelArgs, DataArgs, PromptArgs, AdapterArgs):
    model: str = opt("", "A merged model directory to evaluate instead of an adapter.")
    output_dir: str = opt("outputs/eval", "Directory for eval.json, eval.md, eval.png and failures.jsonl.")
    max_new_tokens: int = opt(256, "Most tokens generated per row (greedy decoding).", check=POSITIVE)
    eval_batch_size: int = opt(8, "Rows per batch for loss and generation.", check=POSITIVE)
    max_rows: int = opt(0, "Evaluate at most this many rows (0 = all).", check=NON_NEGATIVE)
    compare_base: bool = opt(
        False, "Also evaluate the base model without the adapter and report the differences."
    )
    failures: int = opt(
        20, "Worst rows (by score and by loss) written to failures.jsonl.", check=NON_NEGATIVE
    )


@dataclass
class ChatConfig(ModelArgs, PromptArgs, GreedyArgs, AdapterArgs):
    max_new_tokens: int = opt(512, "Most tokens per answer.", check=POSITIVE)


@dataclass
class ListenArgs(CheckedConfig):
    """Where a local web server listens and who may talk to it (lorakit.access has the rules)."""

    host: str = opt("127.0.0.1", "Address to bind (127.0.0.1 = this machine only).")
    api_key: str = opt(
        "",
        "Require `Authorization: Bearer KEY` on the API ('' = the LORAKIT_API_KEY environment "
        "variable, which `ps` does not show; neither = none for serve, a per-launch token for the dashboard).",
    )
    allowed_origins: list[str] = opt(
        [],
        "Web origins (scheme://host:port, shell patterns allowed) whose pages may call the API; "
        "LORAKIT_ALLOWED_ORIGINS adds more. Other origins get HTTP 403.",
    )
    insecure_no_key: bool = opt(
        False, "Allow a non-loopback --host without a key (and the dashboard without its token)."
    )


@dataclass
class ServeConfig(ModelArgs, PromptArgs, SamplingArgs, ListenArgs):
    adapter: list[str] = opt(
        [],
        "Adapters to serve as NAME=DIR (several share one base; the request's model picks one).",
        commas=False,
    )
    port: int = opt(8000, "Port to listen on (0 = any free port, printed at start).", check=between(0, 65535))
    max_tokens_limit: int = opt(1024, "Largest max_tokens a request may ask for.", check=POSITIVE)
    max_request_bytes: int = opt(
        1_000_000, "Largest request body accepted (larger: HTTP 413).", check=POSITIVE
    )
    max_concurrent_requests: int = opt(
        8,
        "Rows generated together in one batch (a request with n choices takes n).",
        check=POSITIVE,
    )
    max_queued_requests: int = opt(
        32,
        "Requests waiting for a place in the batch; more: HTTP 429 with Retry-After.",
        check=NON_NEGATIVE,
    )
    threads: int = opt(
        0,
        "CPU threads for generation (0 = torch's default, one per core; 1 suits a busy machine).",
        check=NON_NEGATIVE,
    )


@dataclass
class DashboardConfig(ListenArgs):
    runs_dir: str = opt("outputs", "Directory holding the run directories to show (searched 4 levels deep).")
    port: int = opt(7860, "Port to listen on (0 = any free port, printed at start).", check=between(0, 65535))
    stale_after: int = opt(
        600,
        "Seconds without a new metrics line after which an unfinished run counts as interrupted, not running.",
        check=POSITIVE,
    )
    threads: int = same_as(ServeConfig, "threads")


@dataclass
class DemoConfig(TrainConfig):
    eval_dataset: str = opt(
        "", "Held-out JSONL file scored before and after training ('' = the bundled demo test split)."
    )
    max_eval_rows: int = opt(40, "Score at most this many held-out rows (0 = all).", check=NON_NEGATIVE)
    max_new_tokens: int = opt(24, "Most tokens generated per held-out prompt.", check=POSITIVE)


@dataclass
class TeacherArgs(CheckedConfig):
    teacher_url: str = opt(
        "", "Base URL of the teacher's OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 (required)."
    )
    teacher_model: str = opt("", "Model name the teacher endpoint serves (required).")
    teacher_api_key_env: str = opt(
        "LORAKIT_TEACHER_API_KEY", "Environment variable holding the teacher's API key (unset: no key)."
    )
    teacher_timeout: float = opt(120.0, "Seconds to wait for one teacher answer.", check=above(0))
    teacher_retries: int = opt(
        3, "Retries of a request after a timeout, HTTP 429, 5xx or a dropped connection.", check=NON_NEGATIVE
    )
    teacher_backoff: float = opt(
        2.0,
        "Seconds before the first retry, doubled at each next one (a 429's Retry-After wins).",
        check=NON_NEGATIVE,
    )
    teacher_temperature: float = opt(0.7, "Sampling temperature of the teacher.", check=between(0, 2))
    teacher_max_tokens: int = opt(2048, "Most tokens one teacher answer may use.", check=POSITIVE)
    max_teacher_tokens: int = opt(
        200_000,
        "Hard budget of teacher tokens (prompt + answer, as the endpoint reports them) for the whole run.",
        check=POSITIVE,
    )


@dataclass
class SynthArgs(TeacherArgs):
    samples_per_group: int = opt(8, "New rows asked of the teacher per group of failures.", check=POSITIVE)
    max_groups: int = opt(16, "Ask for at most this many groups, the largest first.", check=POSITIVE)
    context_rows: int = opt(4, "Failing rows of a group shown to the teacher.", check=POSITIVE)
    verify: str = opt(
        "",
        "Command that checks one row: the row as JSON on stdin, exit 0 = keep "
        "(e.g. 'python scripts/verify_demo_sample.py'; '' = none).",
    )
    verify_timeout: float = opt(30.0, "Seconds the --verify command may take per row.", check=above(0))
    max_sample_chars: int = opt(
        4000, "Longest row kept, in characters of instruction + input + output.", check=POSITIVE
    )
    near_duplicate: float = opt(
        0.8,
        "Character 5-gram Jaccard similarity from which a row is a near-duplicate of a held-out or training row.",
        check=between(0, 1, lo_open=True),
    )


@dataclass
class SynthConfig(SynthArgs):
    failures: str = opt("", "failures.jsonl written by `lorakit eval`, or its output directory (required).")
    eval_dataset: str = opt(
        "",
        "Held-out rows no new row may repeat ('' = the dataset the eval beside --failures scored).",
    )
    dataset: str = opt(
        "", "Training rows no new row may repeat ('' = the training data of the adapter that eval scored)."
    )
    output_dir: str = opt(
        "outputs/synth", "Directory for synth.jsonl, rejected.jsonl, synth_report.json/.md and teacher/."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.failures:
            raise LorakitError("--failures is required: the failures.jsonl written by `lorakit eval`")


@dataclass
class ImproveConfig(SynthArgs, AdapterArgs):
    eval_dataset: str = opt(
        "", "Held-out rows scored before and after each round ('' = the bundled demo test split)."
    )
    dataset: str = opt("", "The student's training data ('' = the data the adapter was trained on).")
    output_dir: str = opt(
        "outputs/improve", "Directory for each round's eval, data, adapter and report, and improve.md."
    )
    rounds: int = opt(1, "Rounds of eval -> synth -> retrain -> eval at most.", check=POSITIVE)
    retrain: str = opt(
        "scratch",
        "Each round trains a new adapter from the base (scratch) or from the last adapter's weights (continue).",
        choices=("scratch", "continue"),
    )
    num_epochs: float = opt(
        0.0, "Epochs of each retraining (0 = the student adapter's own setting).", check=NON_NEGATIVE
    )
    min_gain: float = opt(
        0.0, "Stop when a round raises held-out exact match by this much or less.", check=NON_NEGATIVE
    )
    max_minutes: float = opt(
        0.0,
        "Start no new step (eval, teacher request, training) after this many minutes (0 = no limit).",
        check=NON_NEGATIVE,
    )
    max_eval_rows: int = opt(0, "Score at most this many held-out rows (0 = all).", check=NON_NEGATIVE)
    max_new_tokens: int = opt(64, "Most tokens generated per held-out prompt.", check=POSITIVE)
    eval_batch_size: int = opt(8, "Rows per batch for the evaluations.", check=POSITIVE)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.adapter:
            raise LorakitError(
                "--adapter is required: the student adapter directory written by `lorakit train`"
            )
