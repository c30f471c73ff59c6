"""DeepSpeed's engine around the model: the one place training calls DeepSpeed (sequence.py swaps in its
Ulysses attention, memory.py reads its estimators).

Everything the recipe needs from DeepSpeed, behind a few small methods:
process group, ZeRO-wrapped model, backward with explicit loss
normalisation, step, collectives, checkpoints and the final HF export.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from .. import dist
from . import attention, bf16, fused, lora
from ..config import Config
from ..data import IGNORE
from ..errors import ConfigError
from ..models import causal_lm
from .nll import token_nll

PACKING_TOLERANCE = 0.05  # bf16 noise is ~1e-2 of the logit scale; a leak changes logits by O(1)


def init_distributed(timeout_s: int) -> tuple[int, int]:
    """Join the process group: launcher env vars, or MPI (mpirun) via mpi4py discovery.
    timeout_s bounds every collective (dist.timeout): a dead peer ends the job, not hangs it."""
    from datetime import timedelta

    port = int(os.environ.get("MASTER_PORT", "29500"))
    deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=port, timeout=timedelta(seconds=timeout_s))
    if not is_cpu():  # this rank's device before any collective (DeepSpeed's engine sets it only later):
        # on NCCL the set-up's collectives (the run folder's lock, zero_stage=auto) run there
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))  # set by MPI discovery too
    _unlink_shm_buffer()
    return dist.rank(), dist.world()


def _unlink_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce maps one 66 MiB /dev/shm buffer per rank (all ranks on one node)
    and never unlinks it: every run, and every killed run, would leave them in /dev/shm, which is
    memory. Once every rank has mapped every peer's buffer (they all have when init_distributed
    returns, the barrier makes it certain), the names can go: the mappings stay valid and nothing
    is left behind however the process ends."""
    if not is_cpu():
        return
    dist.barrier()
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), dist.rank())
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # no shm buffer (ranks on several nodes, or no LOCAL_SIZE: mpirun)
        pass


def device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def is_cpu() -> bool:
    return get_accelerator().device_name() == "cpu"


def native_bf16() -> bool:
    """Does this accelerator compute bf16 natively (not by slow emulation)?"""
    if not is_cpu():
        return get_accelerator().is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return cpu_bf16_kind() != "none"


def cpu_bf16_kind() -> str:
    """The CPU's bf16 instructions by /proc/cpuinfo's flags: AMX-BF16, AVX512-BF16 or none (where
    bf16 is emulated, e.g. AVX2 only)."""
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    return "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "none"


def resolve_dtype(cfg: Config) -> str:
    """model.dtype with 'auto' resolved to bf16 or fp32 for this hardware."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "bf16" if native_bf16() else "fp32"


def lr_lambda(cfg: Config):
    t = cfg.train

    def f(step: int) -> float:
        if step < t.lr_warmup_steps:
            return (step + 1) / (t.lr_warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        span = max(1, t.max_steps - t.lr_warmup_steps)
        p = min(1.0, (step - t.lr_warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * p)) if t.schedule == "cosine" else 1 - p
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape

    return f


def ds_config(cfg: Config, universal: bool = False) -> dict:
    """DeepSpeed JSON built from the recipe; train.ds_config (a JSON file) may add or override keys.
    universal: the checkpoint to load is in DeepSpeed's universal form (another world size)."""
    t = cfg.train
    conf = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": resolve_dtype(cfg) == "bf16"},
        "zero_optimization": {
            "stage": t.zero_stage,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": t.weight_decay,
            # FusedAdam on GPU; where there is no CUDA, torch's AdamW over all tensors at once
            # (foreach; its CPU default is one tensor at a time: 6.7% vs 7.6% of a step here)
            "torch_adam": is_cpu(), **({"foreach": True} if is_cpu() else {})}},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": universal},
    }
    if t.ds_config:
        with open(t.ds_config, encoding="utf-8") as f:
            _merge(conf, json.load(f))
    return conf


def _merge(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def jit_arch_list(value: str | None) -> str | None:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed's JIT op builder can read it, or None where it already
    can. Images often name arch-specific targets (`9.0a`, `10.0f`); DeepSpeed 0.19 parses each
    entry's parts as integers and stops with `invalid literal for int() with base 10: '0a'` before
    building its fused Adam. The suffix only adds arch-specific instructions the op does not use."""
    if not value:
        return None
    fixed = ";".join(re.sub(r"^(\d+)\.(\d+)[a-z]+", r"\1.\2", p) for p in value.replace(" ", ";").split(";") if p)
    return None if fixed == value else fixed


def compile_blocks(model) -> int:
    """torch.compile each transformer block (the classes the model names in _no_split_modules), not
    the whole model: the blocks share one compiled graph; what runs between them (the fused head's
    trained-row selection, whose size is data) stays eager instead of breaking the graph. dynamic:
    packed rows vary in length from step to step. Returns how many blocks were compiled."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"model.compile: {type(model).__name__} names no transformer block class "
                          "(_no_split_modules); set model.compile=false")
    for b in blocks:
        b.compile(dynamic=True)
    return len(blocks)


class Engine:
    """A Hugging Face causal LM under DeepSpeed (ZeRO 0-3), AdamW and a warm-up schedule."""

    def __init__(self, cfg: Config, model_path: str, universal: bool = False, vocab: int | None = None):
        """vocab: the tokenizer's size. Given, with data.packing, the start-up check also refuses a model
        that lets the dialogues of a packed row see each other (the recipe passes it; a caller that
        never packs rows need not)."""
        from transformers.integrations import HfDeepSpeedConfig

        self.cfg, self.model_path = cfg, model_path
        conf = ds_config(cfg, universal)
        # Must exist before from_pretrained so weights load straight into ZeRO-3
        # partitions (zero.Init): no rank ever holds the whole model.
        self._hf_ds = HfDeepSpeedConfig(conf) if cfg.train.zero_stage == 3 else None
        # The model's dtype follows the final DeepSpeed config (train.ds_config may override bf16).
        self.dtype = "bf16" if conf.get("bf16", {}).get("enabled") else "fp32"
        dtype = torch.bfloat16 if self.dtype == "bf16" else torch.float32
        self.matmul = bf16.resolve(cfg.model.bf16_matmul, self.dtype, native_bf16())
        if self.matmul == "fp32" and cfg.model.compile:  # torch.compile skips code run under a dispatch mode
            raise ConfigError("model.compile=true and bf16 products computed in fp32 (model.bf16_matmul, auto on a "
                              "CPU without bf16 instructions) do not go together: the compiled blocks would run "
                              "uncompiled. Set model.compile=false, model.dtype=fp32 or model.bf16_matmul=native")
        attention.register()
        self.attention = attention.resolve(cfg.model.attn_implementation)
        model = causal_lm(model_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
                          attn_implementation=self.attention)
        model.config.use_cache = False
        if cfg.model.lora.rank:
            trainable, total = lora.attach(model, cfg.model.lora)
            dist.print0(f"LoRA rank {cfg.model.lora.rank} on {cfg.model.lora.targets}: "
                        f"{trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if cfg.model.lora.rank:
                model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
        # The fused head goes in before DeepSpeed wraps the model (its ZeRO-3 hooks must see it).
        why_not = fused.fusable(model) if cfg.model.fused_loss != "false" else "model.fused_loss=false"
        if why_not is None:
            fused.install(model)
        elif cfg.model.fused_loss == "true":
            raise ConfigError(f"model.fused_loss=true, but {model_path} cannot use the fused LM head and loss: "
                              f"{why_not}. Set model.fused_loss=auto (or false)")
        self.fused = why_not is None
        arch = jit_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST")) if not is_cpu() else None
        if arch is not None:
            dist.print0(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} read as {arch} "
                        "for DeepSpeed's op builds (it cannot parse arch suffixes)")
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=conf,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
        self.world = dist.world()
        if cfg.model.compile:
            compiled = compile_blocks(self.module)
            dist.print0(f"model.compile: {compiled} transformer blocks compiled (torch.compile, one graph for all)")
        packed = bool(vocab) and cfg.data.packing
        if self.fused or packed:
            words = self.module.get_output_embeddings().out_features
            self._check_model(min(vocab or words, words), packed)

    @torch.no_grad()
    def _check_model(self, vocab: int, packed: bool) -> None:
        """The start-up checks, on one row of random tokens (every rank calls: a ZeRO-3 forward is
        collective), three forwards at most:
        - packed: dialogue b after dialogue a in a packed row (position ids restarting) must get the
          logits it gets alone, else the model is refused (it would let packed dialogues see each other);
        - fused: the fused head must give the model's own per-token NLL on that row. A model that does
          anything to its logits after the head (soft-capping, scaling) does not, and keeps the logits
          path (model.fused_loss=auto) or stops (model.fused_loss=true)."""
        g = torch.Generator().manual_seed(0)
        a, b = torch.randint(0, vocab, (1, 12), generator=g), torch.randint(0, vocab, (1, 12), generator=g)
        pos = torch.arange(12)[None]
        alone = {"input_ids": b, "position_ids": pos}
        row = {"input_ids": torch.cat([a, b], 1), "position_ids": torch.cat([pos, pos], 1)} if packed else alone
        self.engine.eval()
        logits = self.forward(row).float()
        if packed:
            own_row = self.forward(alone).float()
            leak = float((logits[:, 12:] - own_row).abs().max() / (1 + own_row.abs().max()))
        if self.fused:
            ids = row["input_ids"]
            targets = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE)], 1).to(self.device)
            own, mine = token_nll(logits, targets), self.token_nll(row, targets)
        self.engine.train()
        if packed and leak > PACKING_TOLERANCE:
            raise ConfigError(f"{self.model_path}: this model does not confine attention to each dialogue of a "
                              "packed row (it ignores restarting position ids), so packed dialogues would see each "
                              "other. Set data.packing=false, or use a model class with packed-sequence support")
        if self.fused:
            self._keep_fused_if_equal(float((mine - own).abs().max() / (1 + own.abs().max())))

    def _keep_fused_if_equal(self, diff: float) -> None:
        if diff <= (5e-2 if self.dtype == "bf16" else 1e-3):
            return
        msg = (f"the fused LM head and loss differ from this model's own logits by {diff:.3g} (relative): "
               "it transforms its logits after the head")
        if self.cfg.model.fused_loss == "true":
            raise ConfigError(msg + ". Set model.fused_loss=auto (or false)")
        dist.print0(msg + "; using the logits path (model.fused_loss=auto)")
        self.fused = False

    @property
    def module(self):
        return self.engine.module

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def _inputs(self, batch: dict) -> dict:
        # use_cache=False: with a cache, transformers would not read packed position ids
        return {**{k: batch[k].to(self.device, non_blocking=True)
                   for k in ("input_ids", "attention_mask", "position_ids") if k in batch}, "use_cache": False}

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits of a padded batch (attention_mask) or a packed one (position_ids restarting per dialogue)."""
        with bf16.products(self.matmul):
            return self.engine(**self._inputs(batch)).logits

    def token_nll(self, batch: dict, targets: torch.Tensor) -> torch.Tensor:
        """[B, S] float32 NLL of each position's target (shifted labels, -100 = untrained: 0 there).
        Fused (model.fused_loss): the head runs on trained positions only, a chunk at a time, and
        no [B, S, V] logits exist; else from the model's logits, chunked (loss.token_nll)."""
        if self.fused:
            with bf16.products(self.matmul):
                return self.engine(**self._inputs(batch), targets=targets)
        return token_nll(self.forward(batch), targets)

    def describe(self, world: int) -> str:
        """The start-up line: what trains, where, how."""
        c = self.cfg
        return (f"model {self.model_path}, {world} rank(s), ZeRO-{c.train.zero_stage}, {self.dtype} "
                f"{'with fp32 products ' if self.matmul == 'fp32' else ''}"
                f"(model.dtype={c.model.dtype}), method {c.train.method}"
                f"{_signals(c)}{', adaptive mixture' if c.data.mixture == 'adaptive' else ''}, "
                f"{'packed' if c.data.packing else 'padded'} rows of {c.data.max_length} tokens, "
                f"{self.attention} attention{' (auto)' if c.model.attn_implementation == 'auto' else ''}, "
                f"{'fused LM head and loss' if self.fused else 'logits path'}{', compiled' if c.model.compile else ''}"
                + (f", sequence parallel {c.train.sequence_parallel} (Ulysses)" if c.train.sequence_parallel > 1 else ""))

    def backward(self, weighted_sum: torch.Tensor, global_tokens: int) -> None:
        """Backward of (sum of w * token NLL on this rank's micro-batch) / N.

        N is the trained-token count of the whole optimizer step over all
        micro-batches and ranks. DeepSpeed averages gradients over ranks, so
        we multiply by world size and skip its division by accumulation steps:
        the summed gradient is exactly grad(sum_all w*l / N) (docs/method.md s.5).
        """
        with bf16.products(self.matmul):  # backward's products run now, under the mode
            self.engine.backward(weighted_sum * (self.world / global_tokens), scale_wrt_gas=False)

    def step(self) -> None:
        """Per micro-step; DeepSpeed applies the optimizer at the accumulation boundary."""
        self.engine.step()

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def skipped_steps(self) -> int:
        """Optimizer steps DeepSpeed skipped (overflow) so far in this process."""
        return int(getattr(self.engine, "skipped_steps", 0) or 0)

    def grad_norm(self) -> float | None:
        g = self.engine.get_global_grad_norm()
        return None if g is None else float(g)

    # -- checkpoints ------------------------------------------------------
    def save(self, ckpt_dir: str, tag: str) -> None:
        """DeepSpeed's part of a checkpoint (collective: every rank calls); ours, and the `latest`
        pointer (moved only once the tag is complete), are checkpoint.py's."""
        self.engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)

    def load(self, ckpt_dir: str, tag: str | None = None) -> str | None:
        path, _ = self.engine.load_checkpoint(ckpt_dir, tag=tag)
        return path


    def _full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights as the module holds them (fp32 or bf16); ZeRO-3 gathers them
        layer by layer onto rank 0 (collective: every rank calls; None on the others)."""
        if self.cfg.train.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()  # "16bit": the module's dtype
        return dict(self.module.state_dict())

    def export_hf(self, out_dir: str, tokenizer) -> None:
        """A plain Hugging Face folder with weights gathered from the shards (rank 0 writes), in
        checkpoint.export_dtype. With LoRA (model.lora.export): the adapters merged into the
        weights, PEFT's adapter folder alone, or both (the adapter in out_dir/adapter)."""
        sd = self._full_state_dict()  # collective: every rank calls
        dtype = torch.bfloat16 if self.cfg.checkpoint.export_dtype == "bf16" else torch.float32
        lc = self.cfg.model.lora
        if dist.rank() == 0:
            tmp = out_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            if lc.rank and lc.export != "merged":
                lora.save_adapter(sd, lc, tmp if lc.export == "adapter" else os.path.join(tmp, "adapter"),
                                  self.cfg.model.path, dtype)
            if not (lc.rank and lc.export == "adapter"):
                sd = lora.merged_state_dict(sd, lc) if lc.rank else sd
                sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
                # The gathered dict holds tied weights (lm_head = embeddings) twice; keep one copy.
                for key in getattr(self.module, "all_tied_weights_keys", None) or {}:
                    sd.pop(key, None)
                self.module.config.dtype = dtype
                self.module.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(tmp, out_dir)
        dist.barrier()


def to_universal(src: str, dst: str) -> None:
    """Rank 0: convert a ZeRO checkpoint folder to DeepSpeed's universal form (world-size free).
    A subprocess: the converter runs its own worker pools."""
    import subprocess
    import sys

    if os.path.exists(os.path.join(dst, "zero")):
        return
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    out = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
                          "--output_folder", tmp, "--num_extract_workers", "2", "--num_merge_workers", "1"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"converting {src} to DeepSpeed's universal checkpoint failed:\n{out.stderr[-3000:]}")
    os.replace(tmp, dst)


def _signals(c) -> str:
    """' on the loss and the excess loss over base' and the like (the start-up line)."""
    words = {"loss": "the loss", "excess": f"the excess loss over {c.stats.reference}"}
    return "" if c.stats.signals == ["loss"] else " on " + " and ".join(words[s] for s in c.stats.signals)
