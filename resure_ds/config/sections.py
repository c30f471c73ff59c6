"""The configuration's sections: one dataclass each, the one source of defaults, each with the
checks of its own values beside it (`problems`; the checks across sections are config/__init__.py's)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError
from .parse import TRACKERS, parse_layout, parse_train, tracker_names, url_secret_error

SIGNALS = ("loss", "excess")
MAX_TIMEOUT = 7 * 24 * 3600


def positive_fields(section: str, obj, *names: str) -> list[str]:
    return [f"{section}.{n}: must be > 0, got {getattr(obj, n)}" for n in names if getattr(obj, n) <= 0]


def nonnegative_fields(section: str, obj, *names: str) -> list[str]:
    return [f"{section}.{n}: must be >= 0, got {getattr(obj, n)}" for n in names if getattr(obj, n) < 0]


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

    def problems(self) -> list[str]:
        e = []
        if self.rank < 0:
            e.append(f"model.lora.rank: must be >= 0 (0 = full fine-tuning), got {self.rank}")
        if self.alpha <= 0:
            e.append(f"model.lora.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            e.append(f"model.lora.dropout: must be in [0, 1), got {self.dropout}")
        t = self.targets
        if isinstance(t, str) and t != "all-linear" or isinstance(t, list) and (
                not t or not all(isinstance(x, str) and x for x in t)):
            e.append(f"model.lora.targets: all-linear or a list of module names (e.g. [q_proj, v_proj]), got {t!r}")
        return e


@dataclass
class ModelConfig:
    path: str = "smollm2"
    """HF model folder or hub id; 'smollm2' = the embedded SmolLM2-135M-Instruct (converted once, cached)."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Training precision. auto: bf16 where the hardware computes it natively (CUDA GPUs with bf16,
    CPUs with AVX-512/AMX bf16), else fp32. bf16 on a CPU without bf16 instructions (AVX2 only) computes its
    products in fp32 (model.bf16_matmul) and runs at about fp32's speed.
    fp16 is not offered: unsupported on CPU and brittle for LM fine-tuning."""
    bf16_matmul: Literal["auto", "native", "fp32"] = "auto"
    """How a bf16 run computes its matrix products (and, on a CPU, attention): native (the hardware's
    bf16 kernels) or fp32 (from the same bf16 operands, each result rounded to bf16; a native matrix
    product sums in fp32 too). auto: fp32 on a CPU without bf16 instructions, whose bf16 kernels are
    many times slower (docs/performance.md), else native. No effect on an fp32 run; not with
    model.compile."""
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

    def problems(self) -> list[str]:
        return self.lora.problems()


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

    def problems(self) -> list[str]:
        e = []
        if self.strength <= 0:
            e.append(f"data.adaptive.strength: must be > 0, got {self.strength}")
        if not 0.0 < self.floor <= 1.0:
            e.append(f"data.adaptive.floor: must be in (0, 1], got {self.floor}")
        if self.max_step <= 0:
            e.append(f"data.adaptive.max_step: must be > 0, got {self.max_step}")
        if self.prior < 0:
            e.append(f"data.adaptive.prior: must be >= 0, got {self.prior}")
        return e


@dataclass
class DataConfig:
    train: str | list = "chitchat"
    """Training data: a .jsonl/.jsonl.gz/.json/.parquet file, a glob, a folder of such files, a saved
    `datasets` folder, a prepared folder, 'chitchat' (embedded), or a list of these, a mixture:
    [{path: a.jsonl, weight: 3}, {path: /data/b/, weight: 1}] (weight = share of the draws). Any of the
    files, globs, folders and prepared folders may be in an object store: s3://bucket/raw/ (gs://, az://, hf://,
    https://; the backend's package installed, credentials from its environment, docs/operating.md)."""
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
    on a cluster, a filesystem every node sees, or an object store (s3://bucket/prepared): prepare publishes
    there, each node keeps a verified local copy ($RESURE_CACHE/fetched)."""
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

    def problems(self) -> list[str]:
        layout, e = parse_layout(self.format, self.columns, "data.")
        e += parse_train(self.train, layout)[1]
        e += positive_fields("data", self, "max_length", "pack_window", "prefetch")
        e += nonnegative_fields("data", self, "prepare_workers", "num_workers")
        if isinstance(self.eval, float) and not 0.0 < self.eval <= 0.5:
            e.append(f"data.eval: a held-out fraction must be in (0, 0.5], got {self.eval}")
        if isinstance(self.eval, str) and not self.eval:
            e.append("data.eval: must be a source path, a fraction in (0, 0.5], or null")
        e += [m for k in ("eval", "prepared_dir") if (m := url_secret_error(f"data.{k}", getattr(self, k)))]
        return e + self.adaptive.problems()


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

    def problems(self) -> list[str]:
        e = positive_fields("stats", self, "num_buckets")
        if not 0.0 < self.decay <= 1.0:
            e.append(f"stats.decay: must be in (0, 1], got {self.decay}")
        if not 0.0 < self.source_decay <= 1.0:
            e.append(f"stats.source_decay: must be in (0, 1], got {self.source_decay}")
        if self.scale == "mad" and self.length_scaled:
            e.append("stats.scale=mad with stats.length_scaled: the robust scale has no per-token form; set one of them")
        sig = self.signals
        if not sig or not all(isinstance(x, str) for x in sig) or len(set(sig)) != len(sig) or set(sig) - set(SIGNALS):
            return e + [f"stats.signals: a list of distinct signals from {list(SIGNALS)}, e.g. [loss] or "
                        f"[loss, excess]; got {sig!r}"]
        if self.reference is not None and not self.reference:
            e.append("stats.reference: a model folder, base (model.path), or null")
        elif self.reference is not None and "excess" not in sig:
            e.append(f"stats.reference={self.reference}: no signal uses it (stats.signals={sig}); the excess signal "
                     "does: stats.signals=[excess] or [loss, excess]")
        return e


@dataclass
class ResureConfig:
    # The defaults are the paper's rule as this project reads it; the noisy-mix study's pre-stated
    # rule decides whether any of them changes (benchmarks/noisy_mix/README.md).
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

    def problems(self) -> list[str]:
        e = positive_fields("resure", self, "s", "eps") + nonnegative_fields("resure", self, "lam", "min_count",
                                                                              "warmup_steps")
        if not 0.0 < self.down_share < 1.0:
            e.append(f"resure.down_share: must be in (0, 1), got {self.down_share}")
        if not 0.0 <= self.floor <= 1.0:
            e.append(f"resure.floor: must be in [0, 1], got {self.floor}")
        return e


@dataclass
class LossTruncationConfig:
    drop_fraction: float = 0.1
    """c: turns above the running (1-c) loss quantile get weight 0."""
    min_count: int = 64
    """Weight 1 until this many turns are in the histogram."""

    def problems(self) -> list[str]:
        e = nonnegative_fields("loss_truncation", self, "min_count")
        if not 0.0 < self.drop_fraction < 1.0:
            e.append(f"loss_truncation.drop_fraction: must be in (0, 1), got {self.drop_fraction}")
        return e


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

    def problems(self) -> list[str]:
        e = positive_fields("train", self, "micro_batch_size", "grad_accum", "max_steps", "sequence_parallel",
                            "log_every", "lr")
        e += nonnegative_fields("train", self, "lr_warmup_steps", "grad_clip", "weight_decay", "stop_after",
                                "max_bad_steps")
        if not 0 <= self.seed < 2 ** 32:
            e.append(f"train.seed: must be in [0, 2^32), got {self.seed}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            e.append(f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.zero_stage not in (0, 1, 2, 3, "auto"):
            e.append(f"train.zero_stage: must be 0, 1, 2, 3 or auto, got {self.zero_stage}")
        try:
            parse_duration(self.time_limit)
        except ValueError as err:
            e.append(f"train.time_limit: {err}")
        if self.profile_steps:
            try:
                first, _ = parse_steps(str(self.profile_steps))
                if first > self.max_steps:
                    e.append(f"train.profile_steps={self.profile_steps}: the run ends at train.max_steps="
                             f"{self.max_steps}, before step {first}")
            except ConfigError as err:
                e.append(str(err))
        return e


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

    def problems(self) -> list[str]:
        e = nonnegative_fields("checkpoint", self, "every", "keep_last")
        if self.resume not in ("auto", "none") and not self.resume:
            e.append("checkpoint.resume: must be auto, none or a checkpoint path")
        return e


@dataclass
class EvalConfig:
    every: int = 0
    """Validate on data.eval every N optimizer steps, and always at the end; 0 = only at the end."""
    micro_batch_size: int = 8
    """Validation dialogues per rank per forward (no gradients: can exceed train.micro_batch_size)."""
    keep_best: bool = False
    """Export the model with the lowest validation loss so far to <run>/best (a plain HF folder)."""

    def problems(self) -> list[str]:
        return positive_fields("eval", self, "micro_batch_size") + nonnegative_fields("eval", self, "every")


@dataclass
class DistConfig:
    timeout: int = 1800
    """Seconds a rank waits in any collective before giving up (a peer died or hangs): the job then
    ends with an error instead of hanging. NCCL enforces it through its watchdog
    (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default), gloo on each call. Must exceed the slowest
    step, checkpoint save and validation pass."""

    def problems(self) -> list[str]:
        e = positive_fields("dist", self, "timeout")
        if self.timeout > MAX_TIMEOUT:
            e.append(f"dist.timeout: at most {MAX_TIMEOUT} seconds (a week), got {self.timeout}")
        return e


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

    def problems(self) -> list[str]:
        e = nonnegative_fields("output", self, "report_top")
        if not self.name or self.name in (".", "..") or "/" in self.name or os.sep in self.name or "\0" in self.name:
            e.append(f"output.name: one folder name under output.dir (no '/', not '.' or '..'), got {self.name!r}")
        if not self.dir:
            e.append("output.dir: must be a folder, got ''")
        names = tracker_names(self.report_to) if isinstance(self.report_to, (str, list)) else []
        e += [f"output.report_to: unknown tracker {t!r} (known: {', '.join(TRACKERS)}, none)" for t in names
              if t not in TRACKERS]
        return e


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


def is_template_text(value: str) -> bool:
    """model.chat_template: Jinja text holds a {{ or {% tag; anything else names a file."""
    return "{{" in value or "{%" in value


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
