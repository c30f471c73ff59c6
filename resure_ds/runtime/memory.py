"""What a recipe needs in memory per device, from the model's config.json alone, and the ZeRO
stage that fits (train.zero_stage=auto). `resure-ds plan` (resure_ds/plan.py) prints these before
a job is queued; the recipe resolves auto with them at start-up.

The model is built on PyTorch's meta device (no weights are read). Per device:

  model states   parameters, gradients and optimizer states at the recipe's ZeRO stage and offload,
                 from DeepSpeed's own estimators (ZeRO-2 and -3; stages 0 and 1 by the same
                 arithmetic: bf16 weights and gradients, fp32 master weights and two Adam moments);
                 with LoRA, the frozen base weights plus the adapters' states
  buffers        what DeepSpeed allocates beside the states at the recipe's settings and its own
                 defaults: the gradient bucket (reduce_bucket_size) and, at ZeRO-3, the parameters
                 kept gathered between forward and backward (up to stage3_max_live_parameters)
  activations    this project's estimate, stated as one: per layer and token, what backward keeps of
                 a Llama-style block (norms, q/k/v/o, the MLP's gate, up and down inputs) in the
                 training dtype, with sdpa/flash attention (no [seq, seq] scores); with
                 model.gradient_checkpointing only each layer's input plus one layer's worth; plus
                 the fused head's fp32 logits of one chunk (as many tokens as a chunk or the
                 micro-step holds, whichever is fewer), twice for backward's softmax, and the CUDA
                 context
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

from .. import dist
from ..config import Config
from ..errors import ConfigError
from ..models import needs_remote_code
from .engine import resolve_dtype
from .fused import chunk_rows
from .lora import attach

GB = 1e9
CONTEXT_BYTES = 1.0e9       # CUDA context, NCCL buffers, allocator slack (an estimate)


@dataclass(frozen=True)
class Shape:
    params: int           # all parameters (tied weights once)
    largest_layer: int    # the most parameters one module holds directly (what ZeRO-3 gathers at once)
    trainable: int        # full fine-tuning: params; LoRA: the adapters'
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int


def model_shape(config_dir: str, cfg: Config) -> Shape:
    """The model of config_dir/config.json built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    where = os.path.join(config_dir, "config.json")
    try:
        with needs_remote_code(config_dir):
            conf = AutoConfig.from_pretrained(config_dir, trust_remote_code=cfg.model.trust_remote_code)
        sizes = {k: getattr(conf, k, None) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers",
                                                     "vocab_size")}
        bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or v <= 0}
        if bad:
            raise ConfigError(f"{where}: {', '.join(f'{k}={v!r}' for k, v in bad.items())}; a model's sizes are "
                              "integers > 0")
        with torch.device("meta"), needs_remote_code(config_dir):
            model = AutoModelForCausalLM.from_config(conf, trust_remote_code=cfg.model.trust_remote_code)
    except ConfigError:
        raise
    except Exception as e:  # a user's file that transformers rejects (its validators raise their own types)
        raise ConfigError(f"{where}: transformers cannot build a causal LM from it ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]}); check model_type and the sizes") from None
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    trainable = params
    if cfg.model.lora.rank > 0:
        trainable, _ = attach(model, cfg.model.lora)
    heads = conf.num_attention_heads
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // heads
    kv = getattr(conf, "num_key_value_heads", None) or heads
    return Shape(params, largest, trainable, conf.num_hidden_layers, conf.hidden_size,
                 getattr(conf, "intermediate_size", 4 * conf.hidden_size), kv * head_dim, conf.vocab_size)


def zero_settings(cfg: Config) -> dict:
    """train.ds_config's zero_optimization (the recipe sets none of these keys itself)."""
    if not cfg.train.ds_config:
        return {}
    with open(cfg.train.ds_config, encoding="utf-8") as f:
        return json.load(f).get("zero_optimization", {})


def offload(cfg: Config) -> tuple[bool, bool]:
    """(optimizer, parameters) offloaded to CPU by train.ds_config."""
    z = zero_settings(cfg)
    return (z.get("offload_optimizer", {}).get("device") == "cpu", z.get("offload_param", {}).get("device") == "cpu")


def dtype_bytes(cfg: Config) -> int:
    """Bytes per weight, gradient or activation element in training: 4 in fp32, else 2 (auto is
    bf16 on a GPU)."""
    return 4 if cfg.model.dtype == "fp32" else 2


# DeepSpeed 0.19's defaults for the keys below
REDUCE_BUCKET, MAX_LIVE, REUSE_DISTANCE = 5e8, 1e9, 1e9


def buffer_bytes(s: Shape, cfg: Config) -> float:
    """DeepSpeed's working memory beside the states, which its estimators leave out (measured:
    benchmarks/plan_memory.py): the gradient bucket of reduce_bucket_size elements it allocates
    whole at start (contiguous_gradients, the default; ZeRO-1/2 keep two with overlap_comm), and at
    ZeRO-3 the parameters it keeps gathered between forward and backward, up to
    stage3_max_live_parameters / stage3_max_reuse_distance (1e9 each: a model under a billion
    parameters is held whole)."""
    z, b = zero_settings(cfg), dtype_bytes(cfg)
    stage = cfg.train.zero_stage
    if stage == 0:
        return 0.0
    bucket = float(z.get("reduce_bucket_size", REDUCE_BUCKET)) * b if z.get("contiguous_gradients", True) else 0.0
    if stage < 3:
        return bucket * (2 if z.get("overlap_comm", False) else 1)
    live = min(float(z.get("stage3_max_live_parameters", MAX_LIVE)),
               float(z.get("stage3_max_reuse_distance", REUSE_DISTANCE)))
    return bucket + min(float(s.params), live) * b


def state_bytes(s: Shape, cfg: Config, gpus: int, nodes: int) -> float:
    """Parameters, gradients and optimizer states on one GPU."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    world, stage = gpus * nodes, cfg.train.zero_stage
    opt_off, par_off = offload(cfg)
    frozen = s.params - s.trainable  # LoRA's base weights: bf16, no gradient, no optimizer state
    if stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(s.trainable, s.largest_layer, gpus, nodes,
                                                          cpu_offload=opt_off, cpu_offload_params=par_off)
        return gpu + (0 if par_off else 2 * frozen / world)
    if stage == 2:
        _, gpu = estimate_zero2_model_states_mem_needs(s.trainable, gpus, nodes, cpu_offload=opt_off)
        return gpu + 2 * frozen
    optimizer = 12 * s.trainable / (world if stage == 1 else 1)
    return 2 * s.params + 2 * s.trainable + (0 if opt_off else optimizer)


def activation_bytes(s: Shape, cfg: Config) -> float:
    """Activations backward keeps on one GPU for one micro-step (an estimate, see the docstring)."""
    tokens = cfg.train.micro_batch_size * cfg.data.max_length
    b = dtype_bytes(cfg)
    per_layer = tokens * b * (6 * s.hidden + 2 * s.kv_dim + 4 * s.intermediate)
    layers = (tokens * b * s.hidden * s.layers + per_layer) if cfg.model.gradient_checkpointing \
        else per_layer * s.layers
    # the fused head's fp32 logits of one chunk of tokens (at most the micro-step's), and backward's softmax
    head = 2 * 4 * s.vocab * min(tokens, chunk_rows(s.vocab))
    return layers + 2 * tokens * b * s.hidden + head  # + embeddings out, final norm; the head


def estimate(s: Shape, cfg: Config, gpus: int, nodes: int) -> dict:
    states, buffers, acts = state_bytes(s, cfg, gpus, nodes), buffer_bytes(s, cfg), activation_bytes(s, cfg)
    return {"states": states, "buffers": buffers, "activations": acts, "context": CONTEXT_BYTES,
            "total": states + buffers + acts + CONTEXT_BYTES}


HEADROOM = 0.9  # train.zero_stage=auto: a stage fits in 90% of the memory (fragmentation, what is not planned)


def choose_stage(s: Shape, cfg: Config, gpus: int, nodes: int, memory: float) -> tuple[int, str]:
    """train.zero_stage=auto: the lowest ZeRO stage whose plan (states, buffers, activations and
    context, as estimate() counts them) fits HEADROOM of `memory` bytes per device; ZeRO-3 when
    none does. Returns the stage and the reason, one line."""
    plans = {z: estimate(s, replace(cfg, train=replace(cfg.train, zero_stage=z)), gpus, nodes)["total"]
             for z in (0, 1, 2, 3)}
    budget = HEADROOM * memory
    listed = ", ".join(f"ZeRO-{z} {t / GB:.1f} GB" for z, t in plans.items())
    for z, total in plans.items():
        if total <= budget:
            return z, (f"the lowest stage whose plan fits {HEADROOM:.0%} of {memory / GB:.1f} GB per device "
                       f"({listed})")
    return 3, (f"no stage's plan fits {HEADROOM:.0%} of {memory / GB:.1f} GB per device ({listed}); ZeRO-3 needs "
               "the least: see `resure-ds plan` for what fits")


def device_memory(local_ranks: int) -> tuple[float, str]:
    """Bytes one rank may plan for, and what they are: the GPU's memory, or on a CPU the host's
    available memory shared by the ranks of this node."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return float(props.total_memory), props.name
    with open("/proc/meminfo", encoding="utf-8") as f:
        kib = next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:"))
    return kib * 1024.0 / max(1, local_ranks), f"host memory available to {local_ranks} rank(s)"


def auto_stage(cfg: Config, model_path: str, world: int) -> tuple[int, str]:
    """train.zero_stage=auto for this machine: choose_stage on the model at model_path, this job's
    ranks and nodes (LOCAL_WORLD_SIZE ranks a node) and this device's memory, in the dtype the run
    will train in."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    memory, what = device_memory(local)
    cfg = replace(cfg, model=replace(cfg.model, dtype=resolve_dtype(cfg)))
    stage, why = choose_stage(model_shape(model_path, cfg), cfg, local, max(1, world // local), memory)
    return stage, f"{why}; {what}"


def resolve_auto_stage(cfg: Config, model_path: str, world: int, found) -> Config:
    """train.zero_stage=auto resolved: a resumed run keeps its checkpoint's stage (`found`: the checkpoint
    it resumes, or None; its partitions follow that stage); else the lowest whose plan fits, the highest
    any rank needs (one all-reduce), printed with the reason."""
    saved = found.progress.trained_on.get("train.zero_stage") if found is not None else None
    if saved is not None:
        stage, why = int(saved), f"the stage of the checkpoint it resumes ({found.path})"
    else:
        mine, why = auto_stage(cfg, model_path, world)
        stage = int(dist.all_reduce_dict({"stage": float(mine)}, op="max")["stage"])
        if stage != mine:
            why = f"another rank has less memory than rank 0 ({why})"
    dist.print0(f"train.zero_stage=auto: ZeRO-{stage}, {why}")
    return replace(cfg, train=replace(cfg.train, zero_stage=stage))
