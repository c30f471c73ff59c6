"""Typed configuration: the one source of defaults.

A recipe is YAML whose sections mirror these dataclasses; `key.sub=value`
overrides (values parsed as YAML) apply on top. Unknown keys, wrong types
and invalid values are all collected into one ConfigError before anything
launches.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import inspect
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ..errors import ConfigError
from .sources import TRACKERS, parse_layout, parse_train, tracker_names

__all__ = ["Config", "ConfigError", "load_config", "split_recipe_args", "to_dict"]


@dataclass
class LoraConfig:
    rank: int = 0
    """LoRA rank r. 0: full fine-tuning. > 0: rank-r adapters (PEFT) on model.lora.targets are trained and the model's own weights stay frozen; ReSURE and ZeRO work unchanged."""
    alpha: float = 16.0
    """Adapter scale numerator: the update is (alpha / rank) * B A."""
    dropout: float = 0.0
    """Dropout on the adapters' input, in [0, 1)."""
    targets: str | list = "all-linear"
    """Modules given adapters: all-linear (every Linear layer but the output head) or a list of module names, e.g. [q_proj, k_proj, v_proj, o_proj]."""
    export: Literal["merged", "adapter", "both"] = "merged"
    """What checkpoint.export writes with LoRA: merged (adapters folded into the weights: a plain model that plain transformers loads), adapter (PEFT's adapter folder alone: adapter_config.json + adapter_model.safetensors), or both (the adapter in export/adapter)."""


@dataclass
class ModelConfig:
    path: str = "smollm2"
    """HF model folder or hub id; 'smollm2' = the embedded SmolLM2-135M-Instruct (converted once, cached)."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Training precision. auto: bf16 where the hardware computes it natively (CUDA GPUs with bf16,
    CPUs with AVX-512/AMX bf16), else fp32 (an AVX2-only CPU emulates bf16: its matrix products ran 7-200x
    slower than fp32 here, benchmarks/matmul_dtype.py).
    fp16 is not offered: unsupported on CPU and brittle for LM fine-tuning."""
    chat_template: str | None = None
    """Chat template to use instead of the tokenizer's own: Jinja text, or the path of a .jinja file. Any template works; one that rewrites history is located in one rendering (docs/method.md)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about 30% more compute."""
    trust_remote_code: bool = False
    """Let transformers run Python code that ships with the model folder (custom architectures).
    Off by default: a model folder from elsewhere then only loads weights and configuration."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "varlen"] = "auto"
    """Attention kernels. Packed rows need attention within each dialogue: sdpa and eager get a dense
    block-diagonal mask over the whole row from transformers; flash_attention_2 (CUDA, the flash-attn
    package) and varlen (PyTorch's variable-length attention on CUDA in bf16; elsewhere sdpa once per
    dialogue) take the dialogues' boundaries and skip what the mask would hide. auto: flash_attention_2
    where flash-attn and a GPU are there, else varlen on a GPU, else sdpa. The start-up check refuses a
    model that lets packed dialogues see each other (resure_ds/runtime/attention.py)."""
    fused_loss: Literal["auto", "true", "false"] = "auto"
    """LM head and per-token loss fused, a chunk of trained tokens at a time: the [tokens, vocab]
    logits are never held whole (resure_ds/runtime/fused.py). auto: where the model has a plain Linear head
    and the start-up check finds the same losses as its own logits, else the logits path; true:
    stop if it cannot; false: the logits path."""
    compile: bool = False
    """torch.compile each transformer block (inductor, dynamic shapes: one graph for all blocks and
    row lengths; resure_ds/runtime/engine.compile_blocks): the first step compiles, later ones run
    fused kernels. Not with train.sequence_parallel (docs/performance.md)."""
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class AdaptiveConfig:
    strength: float = 10.0
    """beta: a source's target share is its configured share times exp(beta * (r - r_pooled)), r its reliability (the mean weight its turns kept), renormalised."""
    floor: float = 0.1
    """Every source's share stays within [floor, 1 / floor] times its configured share (so its turns' weight p / q does too)."""
    max_step: float = 0.05
    """Most a source's log-share moves per optimizer step towards its target, before the shares are renormalised (two sources' log-ratio: at most twice this)."""
    prior: float = 64.0
    """Turns of pooled reliability a source's own is shrunk towards: a source with few turns stays near the pooled value."""


@dataclass
class DataConfig:
    train: str | list = "chitchat"
    """Training data: a .jsonl/.jsonl.gz/.json/.parquet file, a glob, a folder of such files, a saved
    `datasets` folder, a prepared folder, 'chitchat' (embedded), or a list of these, a mixture:
    [{path: a.jsonl, weight: 3}, {path: /data/b/, weight: 1}] (weight = share of the draws)."""
    format: Literal["auto", "openai", "sharegpt", "alpaca", "prompt_completion"] = "auto"
    """Record layout of every source (a data.train entry's own `format` wins); auto = detected per record
    from its fields: messages (OpenAI), conversations (ShareGPT), instruction+output (Alpaca), prompt+completion."""
    columns: dict = field(default_factory=dict)
    """Your field names for ours, e.g. {messages: dialog, role: speaker, content: text} or {instruction: question,
    output: answer}; ours: messages role content conversations from value instruction input output system prompt
    completion id tools tool_calls train weight reasoning_content. A data.train entry's own `columns` add to these."""
    max_length: int = 256
    """Tokens per row; a longer dialogue goes as data.overflow says."""
    overflow: Literal["split", "cut", "drop"] = "split"
    """A dialogue longer than max_length: split = several rows, each ending at the end of a reply, so every
    reply trains once, whole, at its true depth, after as much history as fits (a reply longer than max_length
    alone trains its first tokens, flagged partial); cut = its first max_length tokens (later replies never
    train); drop = left out. Counts in the manifest and summary.txt (resure_ds/data/overflow.py)."""
    train_reasoning: bool = True
    """An assistant message's reasoning_content, where the chat template renders it (Qwen3: the replies after the
    last user message), trains with the reply; false: it is context. A reasoning the template leaves out is
    counted (manifest: reasoning_not_rendered)."""
    skip_invalid: bool = False
    """Skip bad records (and template refusals) and report counts per kind, instead of stopping with an error."""
    packing: bool = True
    """Pack several dialogues into each row of max_length tokens, attention confined to each dialogue;
    false: one dialogue per row, padded."""
    pack_window: int = 8192
    """Dialogues of the epoch's shuffled order packed together: larger = denser rows."""
    prepared_dir: str | None = None
    """Cache of prepared token shards (default $RESURE_CACHE/prepared, else ~/.cache/resure_ds/prepared);
    on a cluster, a filesystem every node sees."""
    prepare_workers: int = 0
    """Processes that tokenize during prepare; 0 = one per CPU core (at most 16)."""
    num_workers: int = 1
    """Background processes per rank that assemble batches; 0 = in the training loop."""
    prefetch: int = 4
    """Batches each loader worker builds ahead."""
    mixture: Literal["fixed", "adaptive"] = "fixed"
    """fixed: every source weighs as data.train says. adaptive (beyond the paper): each source's share follows its running reliability (data.adaptive; docs/method.md s.10), applied as a weight on its turns' loss (the draws stay those of data.train, so the order is the same on any world size)."""
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    eval: str | float | None = None
    """Validation data: a source path (any form data.train takes, one source), or a fraction in (0, 0.5]
    of every training source held out by a hash of the dialogue id (never trained on); none = no validation."""


@dataclass
class StatsConfig:
    num_buckets: int = 8
    """K: turn depths >= K-1 share the last bucket."""
    decay: float = 1.0
    """Scale of running n and M2 before each merge; 1 = cumulative Welford (the paper)."""
    length_scaled: bool = False
    """Length-aware z (beyond the paper): a turn's loss is a mean over its c trained tokens, so a short reply's varies far more than a long one's. On: statistics weighted by c estimate a per-token spread sigma, and z = (L - mean) / (sigma / sqrt(c) + eps), so short replies are not flagged first for being short. Off: the paper's z (docs/method.md s.3-4)."""
    scale: Literal["std", "mad"] = "std"
    """What z measures a turn against: std = the bucket's mean and standard deviation (the paper); mad = its median and 1.4826 * median absolute deviation (beyond the paper), which the corrupted turns themselves pull far less (docs/method.md s.3). Not with stats.length_scaled."""
    signals: list = field(default_factory=lambda: ["loss"])
    """What the statistics and weights see per turn: [loss] (its mean token loss: the paper), [excess] (its loss minus a reference model's on the same tokens, beyond the paper: docs/method.md s.8), or [loss, excess]: each signal keeps its own per-depth statistics and gives a weight, and the turn trains with the smaller (s.9)."""
    reference: str | None = None
    """The reference model of the excess signal: a model folder, or base (model.path, the default when stats.signals holds excess). Its losses are scored once beside the prepared shards (resure-ds score RECIPE; launch/train.sh runs it when scores are missing)."""
    source_decay: float = 1.0
    """Scale of each source's running reliability (its turns' count and weight sum) before each micro-step's turns are added; 1 = cumulative (docs/method.md s.10)."""


@dataclass
class ResureConfig:
    # Defaults kept after the noisy-mix study (benchmarks/noisy_mix/README.md): no sweep variant
    # beat them by more than the spread over seeds; the numbers are in the project README.
    weight_fn: Literal["hard", "exp", "sigmoid"] = "exp"
    """z -> weight: hard (0 above tau), exp (exp(-lam*max(0, z-tau))), sigmoid (1/(1+exp((z-tau)/s)))."""
    tau: float = 1.5
    """z threshold above which a turn counts as unreliable (resure.threshold=z)."""
    threshold: Literal["z", "quantile"] = "z"
    """z: the fixed tau (the paper's rule). quantile (beyond the paper): per turn-depth bucket, the z of its (1 - down_share) quantile, so a set share of each bucket is past the threshold; a fixed tau cannot flag a cluster that is more than 1 / (1 + tau^2) of its bucket (docs/method.md s.4). Not with stats.length_scaled."""
    down_share: float = 0.1
    """resure.threshold=quantile: the share of each bucket past the threshold, per signal. Only weight_fn=hard removes all of it; the step metrics give the share removed (weight_removed) beside it."""
    lam: float = 1.0
    """Decay rate of the exp weight past tau."""
    s: float = 0.5
    """Temperature of the sigmoid weight."""
    level: Literal["turn", "sample"] = "turn"
    """turn: each turn its own weight; sample: all turns get the dialogue's minimum."""
    propagate: Literal["none", "forward"] = "none"
    """forward: turn t gets min(w_0..w_t), so an unreliable early turn down-weights later ones."""
    two_sided: bool | list = False
    """Abnormally low values are unreliable too (copied or memorised boilerplate is easier to predict than a genuine reply): true for every signal, or a list of signals, e.g. [excess]. With the fixed tau, |z| replaces z; with the quantile threshold, down_share is split evenly between the two tails."""
    floor: float = 0.0
    """Lower bound of every weight."""
    min_count: int = 32
    """Weight 1 while a bucket has fewer turns than this (warm-up)."""
    warmup_steps: int = 0
    """Weight 1 for the first optimizer steps, whatever the counts."""
    eps: float = 1e-6
    """Added to the std in z."""


@dataclass
class LossTruncationConfig:
    drop_fraction: float = 0.1
    """c: turns above the running (1-c) loss quantile get weight 0."""
    min_count: int = 64
    """Weight 1 until this many turns are in the histogram."""


@dataclass
class TrainConfig:
    method: Literal["resure", "sft", "loss_truncation", "dft"] = "resure"
    """sft: weights 1 (statistics still tracked); resure; loss_truncation (baseline); dft (baseline, Wu et al. 2025): weights 1 and each token's loss scaled by its detached probability exp(-loss) (docs/method.md s.6)."""
    micro_batch_size: int = 4
    """Sequences per rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    max_steps: int = 60
    """Optimizer steps (the budget; same for every method)."""
    stop_after: int = 0
    """Stop after this many optimizer steps of this invocation (counted from where it started or
    resumed): checkpoint saved, exit status 75; the same command continues. 0 = run to max_steps."""
    max_bad_steps: int = 3
    """The run has diverged after this many consecutive optimizer steps whose loss or gradient norm is not finite, that trained no turn with a finite loss, or that DeepSpeed skipped (overflow): it stops with an error and exports nothing (no checkpoint is saved during such a streak; the last one stays). 0 = never stop for it."""
    time_limit: str | float = ""
    """Wall-clock budget of this invocation: seconds, or 90m, 4h, 1:30:00. The run stops at the last
    step boundary that leaves time to save (checkpoint, exit status 75). Empty = none."""
    lr: float = 2e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, to min_lr_ratio * lr."""
    lr_warmup_steps: int = 5
    """Linear learning-rate warm-up steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    zero_stage: int | Literal["auto"] = 3
    """DeepSpeed ZeRO stage 0-3, or auto: the lowest stage whose planned memory per device (model and
    optimizer states from DeepSpeed's estimators, DeepSpeed's buffers, activations: `resure-ds plan`)
    fits 90% of the device's (a GPU's memory; on a CPU the host's available memory per local rank),
    taken as the highest over ranks and printed at start-up with the reason. A resumed run keeps its
    checkpoint's stage."""
    sequence_parallel: int = 1
    """Ulysses sequence parallelism (DeepSpeed's): each row is cut along the sequence over this many ranks, for
    rows longer than one rank holds; it must divide the ranks and the model's attention heads. The per-turn
    losses, statistics and weights are the whole row's (resure_ds/runtime/sequence.py). 1 = off."""
    ds_config: str | None = None
    """Optional DeepSpeed JSON merged over the generated config (e.g. recipes/ds_offload.json)."""
    profile_steps: int | str | None = None
    """Steps A-B (e.g. 5-7) under torch.profiler on rank 0: profile.txt (the operators and kernels with
    the most self time; on a GPU, how busy the device was) and profile.json (a Chrome trace) in the
    run folder (resure_ds/runtime/profile.py). Empty = off."""
    seed: int = 1234
    """Seeds data order, model-side RNG and everything else."""
    log_every: int = 1
    """Progress-bar refresh and tracker interval (output.report_to; metrics.jsonl gets every step)."""


@dataclass
class CheckpointConfig:
    every: int = 30
    """Save every N optimizer steps (and always at the end); 0 = only at the end."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted. 0 = save none (throwaway runs such as the study)."""
    resume: str = "auto"
    """auto: resume from the newest checkpoint in the run folder if any; none; or a checkpoint path."""
    export: bool = True
    """Write a plain Hugging Face folder (weights, tokenizer, template) at the end."""
    export_dtype: Literal["bf16", "fp32"] = "bf16"
    """Weights of the exported folders (export/, best/): bf16 (half the size) or fp32 (the trained
    weights exactly when training ran in fp32)."""


@dataclass
class EvalConfig:
    every: int = 0
    """Validate on data.eval every N optimizer steps, and always at the end; 0 = only at the end."""
    micro_batch_size: int = 8
    """Validation dialogues per rank per forward (no gradients: can exceed train.micro_batch_size)."""
    keep_best: bool = False
    """Export the model with the lowest validation loss so far to <run>/best (a plain HF folder)."""


@dataclass
class DistConfig:
    timeout: int = 1800
    """Seconds a rank waits in any collective before giving up (a peer died or hangs): the job then
    ends with an error instead of hanging. NCCL enforces it through its watchdog
    (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default), gloo on each call. Must exceed the slowest
    step, checkpoint save and validation pass."""


@dataclass
class OutputConfig:
    dir: str = "runs"
    """Parent folder of run folders."""
    name: str = "resure-default"
    """Run folder name: outputs go to <dir>/<name>/."""
    report_to: str | list = "tensorboard"
    """Trackers for the step metrics (every train.log_every steps): tensorboard, wandb, mlflow, a list of them, or none. wandb and mlflow are optional packages, offline/local by default (resure_ds/runtime/trackers.py): wandb under <run>/wandb unless WANDB_MODE=online, mlflow to MLFLOW_TRACKING_URI or sqlite:///<run>/mlflow.db."""
    project: str = "resure-ds"
    """wandb project / mlflow experiment that runs log to (the run is named output.name)."""
    plot: bool = True
    """Write training.png at the end (about 1.5 s; off for sweeps of many small runs)."""
    report: bool = True
    """Write report.html at the end: the data-quality report (one self-contained page; its plots follow output.plot)."""
    report_top: int = 50
    """Most down-weighted turns the report lists with their text."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    resure: ResureConfig = field(default_factory=ResureConfig)
    loss_truncation: LossTruncationConfig = field(default_factory=LossTruncationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def parse_steps(spec: str) -> tuple[int, int]:
    """train.profile_steps: 'A-B' (or 'A') -> (A, B), 1 <= A <= B."""
    try:
        a, _, b = spec.partition("-")
        first, last = int(a), int(b or a)
    except ValueError:
        raise ConfigError(f"train.profile_steps={spec!r}: give the steps as A-B (e.g. 5-7) or one step") from None
    if not 1 <= first <= last:
        raise ConfigError(f"train.profile_steps={spec!r}: need 1 <= A <= B")
    return first, last


def _check_type(value: Any, tp: Any) -> Any:
    """Return value coerced to tp, or raise TypeError/ValueError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(value, bool) and str(value).lower() in typing.get_args(tp):
            value = str(value).lower()  # YAML reads true/false as booleans: auto|true|false options
        if value not in typing.get_args(tp):
            raise ValueError(f"must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for a in options[:-1]:
            try:
                return _check_type(value, a)
            except (TypeError, ValueError):
                pass
        return _check_type(value, options[-1])
    if tp is list and isinstance(value, list):
        return value
    if tp is dict and isinstance(value, dict):
        return value
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 3e-5 (no dot) as a string; accept what Python reads as a number
            x = float(value)
        except ValueError:
            x = None
        if x is not None:
            if not math.isfinite(x):  # .nan, .inf: no option means anything with them
                raise ValueError(f"must be a finite number, got {value!r}")
            return x
    if tp in (int, bool, str) and type(value) is tp:
        return value
    raise TypeError(f"must be {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")


def _build(cls, data: dict, prefix: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in hints:
            errors.append(f"{name}: unknown key (known: {', '.join(hints)})")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                errors.append(f"{name}: must be a section (mapping), got {value!r}")
                continue
            kwargs[key] = _build(tp, value, name + ".", errors)
        else:
            try:
                kwargs[key] = _check_type(value, tp)
            except (TypeError, ValueError) as e:
                errors.append(f"{name}: {e}")
    return cls(**kwargs)


def is_template_text(value: str) -> bool:
    """model.chat_template: Jinja text holds a {{ or {% tag; anything else names a file."""
    return "{{" in value or "{%" in value


def _validate(c: Config) -> list[str]:
    e: list[str] = []
    t = c.model.chat_template
    if t is not None and not is_template_text(t) and not os.path.isfile(t):
        e.append(f"model.chat_template: {t!r} is neither a file nor Jinja text (no {{{{ or {{% tag); give the "
                 "path of a .jinja file that exists, or the template itself")
    layout, errs = parse_layout(c.data.format, c.data.columns, "data.")
    e += errs + parse_train(c.data.train, layout)[1]
    pos = [("data.max_length", c.data.max_length), ("data.pack_window", c.data.pack_window),
           ("data.prefetch", c.data.prefetch),
           ("stats.num_buckets", c.stats.num_buckets), ("train.micro_batch_size", c.train.micro_batch_size),
           ("train.grad_accum", c.train.grad_accum), ("train.max_steps", c.train.max_steps),
           ("train.sequence_parallel", c.train.sequence_parallel),
           ("train.log_every", c.train.log_every), ("eval.micro_batch_size", c.eval.micro_batch_size),
           ("dist.timeout", c.dist.timeout),
           ("resure.s", c.resure.s), ("resure.eps", c.resure.eps), ("train.lr", c.train.lr)]
    e += [f"{k}: must be > 0, got {v}" for k, v in pos if v <= 0]
    nonneg = [("resure.lam", c.resure.lam), ("resure.min_count", c.resure.min_count),
              ("resure.warmup_steps", c.resure.warmup_steps), ("train.lr_warmup_steps", c.train.lr_warmup_steps),
              ("train.grad_clip", c.train.grad_clip), ("train.weight_decay", c.train.weight_decay),
              ("checkpoint.every", c.checkpoint.every), ("train.stop_after", c.train.stop_after),
              ("train.max_bad_steps", c.train.max_bad_steps),
              ("eval.every", c.eval.every),
              ("checkpoint.keep_last", c.checkpoint.keep_last), ("output.report_top", c.output.report_top),
              ("loss_truncation.min_count", c.loss_truncation.min_count),
              ("data.prepare_workers", c.data.prepare_workers), ("data.num_workers", c.data.num_workers)]
    e += [f"{k}: must be >= 0, got {v}" for k, v in nonneg if v < 0]
    name = c.output.name
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        e.append(f"output.name: one folder name under output.dir (no '/', not '.' or '..'), got {name!r}")
    if not c.output.dir:
        e.append("output.dir: must be a folder, got ''")
    if not 0 <= c.train.seed < 2 ** 32:
        e.append(f"train.seed: must be in [0, 2^32), got {c.train.seed}")
    if c.dist.timeout > MAX_TIMEOUT:
        e.append(f"dist.timeout: at most {MAX_TIMEOUT} seconds (a week), got {c.dist.timeout}")
    if c.train.sequence_parallel > 1 and c.model.attn_implementation == "eager":
        e.append("train.sequence_parallel with model.attn_implementation=eager: "
                 "DeepSpeed's Ulysses attention runs sdpa, varlen or flash_attention_2; set one of them (or auto)")
    if c.train.profile_steps:
        try:
            first, _ = parse_steps(str(c.train.profile_steps))
            if first > c.train.max_steps:
                e.append(f"train.profile_steps={c.train.profile_steps}: the run ends at train.max_steps="
                         f"{c.train.max_steps}, before step {first}")
        except ConfigError as err:
            e.append(str(err))
    if c.train.sequence_parallel > 1 and c.model.compile:
        e.append("model.compile with train.sequence_parallel: the Ulysses attention is swapped in after the "
                 "engine is built, under a compiled model; set one of them")
    if not 0.0 < c.stats.decay <= 1.0:
        e.append(f"stats.decay: must be in (0, 1], got {c.stats.decay}")
    if c.stats.scale == "mad" and c.stats.length_scaled:
        e.append("stats.scale=mad with stats.length_scaled: the robust scale has no per-token form; "
                 "set one of them")
    e += _validate_signals(c)
    if not 0.0 < c.resure.down_share < 1.0:
        e.append(f"resure.down_share: must be in (0, 1), got {c.resure.down_share}")
    if c.resure.threshold == "quantile" and c.stats.length_scaled:
        e.append("resure.threshold=quantile with stats.length_scaled: the bucket's quantile has no per-length "
                 "form; set one of them")
    e += _validate_adaptive(c)
    if not 0.0 <= c.resure.floor <= 1.0:
        e.append(f"resure.floor: must be in [0, 1], got {c.resure.floor}")
    if not 0.0 < c.loss_truncation.drop_fraction < 1.0:
        e.append(f"loss_truncation.drop_fraction: must be in (0, 1), got {c.loss_truncation.drop_fraction}")
    if not 0.0 <= c.train.min_lr_ratio <= 1.0:
        e.append(f"train.min_lr_ratio: must be in [0, 1], got {c.train.min_lr_ratio}")
    lora = c.model.lora
    if lora.rank < 0:
        e.append(f"model.lora.rank: must be >= 0 (0 = full fine-tuning), got {lora.rank}")
    if lora.alpha <= 0:
        e.append(f"model.lora.alpha: must be > 0, got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        e.append(f"model.lora.dropout: must be in [0, 1), got {lora.dropout}")
    if isinstance(lora.targets, str) and lora.targets != "all-linear" or isinstance(lora.targets, list) and (
            not lora.targets or not all(isinstance(t, str) and t for t in lora.targets)):
        e.append(f"model.lora.targets: all-linear or a list of module names (e.g. [q_proj, v_proj]), "
                 f"got {lora.targets!r}")
    for t in tracker_names(c.output.report_to) if isinstance(c.output.report_to, (str, list)) else []:
        if t not in TRACKERS:
            e.append(f"output.report_to: unknown tracker {t!r} (known: {', '.join(TRACKERS)}, none)")
        elif t != "tensorboard" and importlib.util.find_spec(t) is None:
            e.append(f"output.report_to: {t} is not installed (pip install {t}), or drop it from output.report_to")
    if c.train.zero_stage not in (0, 1, 2, 3, "auto"):
        e.append(f"train.zero_stage: must be 0, 1, 2, 3 or auto, got {c.train.zero_stage}")
    try:
        parse_duration(c.train.time_limit)
    except ValueError as err:
        e.append(f"train.time_limit: {err}")
    if isinstance(c.data.eval, float) and not 0.0 < c.data.eval <= 0.5:
        e.append(f"data.eval: a held-out fraction must be in (0, 0.5], got {c.data.eval}")
    if isinstance(c.data.eval, str) and not c.data.eval:
        e.append("data.eval: must be a source path, a fraction in (0, 0.5], or null")
    if (c.eval.every or c.eval.keep_best) and c.data.eval is None:
        e.append("eval.every / eval.keep_best: set data.eval (a validation source or a held-out fraction)")
    if c.checkpoint.resume not in ("auto", "none") and not c.checkpoint.resume:
        e.append("checkpoint.resume: must be auto, none or a checkpoint path")
    return e


SIGNALS = ("loss", "excess")
MAX_TIMEOUT = 7 * 24 * 3600


def _validate_signals(c: Config) -> list[str]:
    """stats.signals, stats.reference and resure.two_sided read together."""
    e, sig = [], c.stats.signals
    if not sig or not all(isinstance(x, str) for x in sig) or len(set(sig)) != len(sig) or set(sig) - set(SIGNALS):
        return [f"stats.signals: a list of distinct signals from {list(SIGNALS)}, e.g. [loss] or [loss, excess]; "
                f"got {sig!r}"]
    if c.stats.reference is not None and not c.stats.reference:
        e.append("stats.reference: a model folder, base (model.path), or null")
    elif c.stats.reference is not None and "excess" not in sig:
        e.append(f"stats.reference={c.stats.reference}: no signal uses it (stats.signals={sig}); the excess signal "
                 "does: stats.signals=[excess] or [loss, excess]")
    two = c.resure.two_sided
    if isinstance(two, list) and (not all(isinstance(x, str) for x in two) or set(two) - set(sig)):
        e.append(f"resure.two_sided: true, false, or a list of signals of stats.signals ({sig}); got {two!r}")
    if not 0.0 < c.stats.source_decay <= 1.0:
        e.append(f"stats.source_decay: must be in (0, 1], got {c.stats.source_decay}")
    return e


def _validate_adaptive(c: Config) -> list[str]:
    a, e = c.data.adaptive, []
    if a.strength <= 0:
        e.append(f"data.adaptive.strength: must be > 0, got {a.strength}")
    if not 0.0 < a.floor <= 1.0:
        e.append(f"data.adaptive.floor: must be in (0, 1], got {a.floor}")
    if a.max_step <= 0:
        e.append(f"data.adaptive.max_step: must be > 0, got {a.max_step}")
    if a.prior < 0:
        e.append(f"data.adaptive.prior: must be >= 0, got {a.prior}")
    return e


def two_sided(cfg: Config, signal: str) -> bool:
    """Whether resure.two_sided covers `signal`."""
    t = cfg.resure.two_sided
    return signal in t if isinstance(t, list) else bool(t)


def parse_duration(text: str) -> float:
    """train.time_limit -> seconds (0 = none): '3600', '90s', '45m', '4h', '1:30:00', '30:00'."""
    t = str(text).strip().lower()
    if not t:
        return 0.0
    try:
        if ":" in t:
            parts = [float(x) for x in t.split(":")]
            if len(parts) > 3:
                raise ValueError
            return sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
        scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(t[-1])
        value = float(t[:-1]) * scale if scale else float(t)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a duration (use seconds, 90m, 4h or 1:30:00)") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value (e.g. train.lr=1e-5)")
    key, raw = item.split("=", 1)
    try:
        return key.strip().split("."), yaml.load(raw, Loader=UniqueKeyLoader) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote "
                          "text with brackets or colons, e.g. key='[a, b]'") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML would keep
    the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for k, _ in node.value:
            key = self.construct_object(k, deep=deep)
            if not isinstance(key, typing.Hashable):
                break  # PyYAML's own error follows
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", k.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def split_recipe_args(args: list[str]) -> tuple[str | None, list[str]]:
    """Command-line words -> (recipe path or None, overrides): a recipe is a leading .yaml/.yml file."""
    if args and args[0].endswith((".yaml", ".yml")):
        return args[0], list(args[1:])
    return None, list(args)


def recipe_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a command that takes [RECIPE.yaml] and dotted key=value overrides, as training
    does; parse with parse_intermixed_args, so its options may come before, between or after them."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="[RECIPE.yaml] then dotted key=value overrides")
    return ap


def positive(kind, most: float = math.inf):
    """An argparse type: a finite number > 0 (and <= most) of `kind`: a command's counts and sizes
    are checked where they are read (0 GPUs divided by zero; a NaN memory 'fitted')."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(v) and 0 < v <= most):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0{f' and <= {most:g}' if most < math.inf else ''}"
                                             f", got {text!r}")
        return v
    parse.__name__ = kind.__name__
    return parse


def load_config(recipe: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    """YAML recipe (optional) + dotted overrides -> validated Config."""
    data: dict = {}
    if recipe:
        try:
            with open(recipe, encoding="utf-8") as f:
                data = yaml.load(f, Loader=UniqueKeyLoader) or {}
        except FileNotFoundError:
            raise ConfigError(f"{recipe}: no such recipe file (see recipes/)") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{recipe}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{recipe}: a recipe must be a mapping of sections")
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[path[-1]] = value
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)
    if not errors:
        errors = _validate(cfg)
    if errors:
        where = f" in {recipe}" if recipe else ""
        raise ConfigError(f"{len(errors)} config problem(s){where}:\n  " + "\n  ".join(errors))
    if "excess" in cfg.stats.signals and cfg.stats.reference is None:  # the excess signal's default reference
        cfg.stats.reference = "base"
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def option_table() -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every option, docs read from this file's field docstrings."""

    def section(cls, prefix: str) -> list[tuple[str, str, str]]:
        body = ast.parse(inspect.getsource(cls)).body[0].body
        docs = {}
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = " ".join(b.value.value.split())
        default, hints, rows = cls(), typing.get_type_hints(cls), []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):  # a subsection (model.lora): its options, in place
                rows += section(hints[f.name], f"{prefix}{f.name}.")
            else:
                rows.append((f"{prefix}{f.name}", repr(getattr(default, f.name)), docs.get(f.name, "")))
        return rows

    hints = typing.get_type_hints(Config)
    return [row for s in dataclasses.fields(Config) for row in section(hints[s.name], f"{s.name}.")]


def markdown_table() -> str:
    lines = ["| option | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | `{d}` | {doc.replace('|', chr(92) + '|')} |" for k, d, doc in option_table()]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m resure_ds.config: the option table of docs/configuration.md
    print(markdown_table())
