"""Before a job is queued: what a recipe will need per GPU, and whether it fits.

    resure-ds plan RECIPE [key=value ...] [--gpus 8] [--gpu-memory 80] [--nodes 1] [--config DIR]

The model is built on PyTorch's meta device from its config.json (no weights are read; --config
names a folder holding the config.json of a model that is not here, e.g. tests/fixtures/
architectures/llama3.1-8b), so an 8B or 70B recipe is planned on a laptop. Per GPU:

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
  total          against --gpu-memory (GB = 10^9 bytes); past it, the first change of a fixed list
                 that fits is named, and the exit status is 2

Also: tokens per optimizer step (packed rows: an upper bound) and, when the corpus is already
prepared, optimizer steps per epoch.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace

from .config import Config, ConfigError, load_config, recipe_parser, split_recipe_args
from .config.sources import train_specs
from .data.prepare import prepared_folder, tokenizer_fingerprints
from .data.sources import resolve
from .errors import DataError
from .models import load_tokenizer, resolve_model_path
from .runtime.fused import chunk_rows
from .runtime.lora import attach

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

    conf = AutoConfig.from_pretrained(config_dir, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf, trust_remote_code=cfg.model.trust_remote_code)
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


def remedies(cfg: Config) -> list[tuple[str, Config]]:
    """Changes tried in order when a plan does not fit: each one more than the last."""
    t, c, out = cfg.train, cfg, []
    if not c.model.gradient_checkpointing:
        c = replace(c, model=replace(c.model, gradient_checkpointing=True))
        out.append(("model.gradient_checkpointing=true", c))
    if t.micro_batch_size > 1:
        k = t.micro_batch_size
        c = replace(c, train=replace(c.train, micro_batch_size=1, grad_accum=t.grad_accum * k))
        out.append((f"train.micro_batch_size=1 train.grad_accum={t.grad_accum * k}", c))
    if t.zero_stage != 3:
        c = replace(c, train=replace(c.train, zero_stage=3))
        out.append(("train.zero_stage=3", c))
    if not any(offload(c)):
        c = replace(c, train=replace(c.train, ds_config=os.path.join(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), "recipes", "ds_offload.json")))
        out.append(("train.ds_config=recipes/ds_offload.json (parameters and optimizer in CPU memory)", c))
    return out


def steps_per_epoch(cfg: Config, tokens_per_step: int) -> str:
    """From the prepared corpus's manifest when it is prepared (nothing is prepared here)."""
    try:
        path = resolve_model_path(cfg.model.path) if cfg.model.path == "smollm2" else cfg.model.path
        if not os.path.isdir(path):
            return "n/a (the model's tokenizer is not here)"
        fps = tokenizer_fingerprints(load_tokenizer(path, cfg.model.chat_template, cfg.model.trust_remote_code))
        tokens = 0
        for spec in train_specs(cfg.data):
            src = resolve(spec)
            folder = src.files[0] if src.kind == "prepared" else prepared_folder(spec, src, fps, cfg)
            with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
                tokens += json.load(f)["counts"]["tokens"]
    except (OSError, DataError, ValueError):
        return "n/a (the corpus is not prepared yet: resure-ds prepare RECIPE)"
    return f"about {tokens / tokens_per_step:,.0f} ({tokens:,} prepared tokens; packed rows)"


def main(argv: list[str] | None = None) -> int:
    ap = recipe_parser(__doc__)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    ap.add_argument("--gpu-memory", type=float, default=80.0, help="memory per GPU in GB (default 80)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    ap.add_argument("--config", default=None, help="a folder with the model's config.json (default: model.path)")
    a = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(*split_recipe_args(a.args))
        where = a.config or resolve_model_path(cfg.model.path)
        if not os.path.exists(os.path.join(where, "config.json")):
            raise ConfigError(f"{where}: no config.json; give --config DIR (a folder holding the model's "
                              "config.json) for a model that is not here")
        s = model_shape(where, cfg)
    except (ConfigError, DataError, OSError) as e:
        print(f"[resure_ds] error: {e}", file=sys.stderr)
        return 2
    world = a.gpus * a.nodes
    t = cfg.train
    per_step = world * t.micro_batch_size * t.grad_accum * cfg.data.max_length
    e = estimate(s, cfg, a.gpus, a.nodes)
    opt_off, par_off = offload(cfg)
    print(f"model        {where}: {s.params / 1e9:.2f} B parameters ({s.trainable / 1e9:.3f} B trained"
          f"{', LoRA rank %d' % cfg.model.lora.rank if cfg.model.lora.rank else ''}), {s.layers} layers, "
          f"largest layer {s.largest_layer / 1e6:.0f} M")
    print(f"job          {a.nodes} node(s) x {a.gpus} GPU(s) of {a.gpu_memory:g} GB; ZeRO-{t.zero_stage}"
          f"{', optimizer offloaded' if opt_off else ''}{', parameters offloaded' if par_off else ''}; "
          f"{t.micro_batch_size} x {cfg.data.max_length} tokens per micro-step, gradient checkpointing "
          f"{'on' if cfg.model.gradient_checkpointing else 'off'}")
    print(f"per GPU      model states {e['states'] / GB:.1f} GB + DeepSpeed buffers {e['buffers'] / GB:.1f} GB + "
          f"activations {e['activations'] / GB:.1f} GB "
          f"(estimate) + context {e['context'] / GB:.1f} GB = {e['total'] / GB:.1f} GB of {a.gpu_memory:g}")
    print(f"tokens/step  {per_step:,} at most ({world} GPUs x {t.micro_batch_size} x {t.grad_accum} x "
          f"{cfg.data.max_length})")
    print(f"steps/epoch  {steps_per_epoch(cfg, per_step)}")
    if e["total"] <= a.gpu_memory * GB:
        print("fits")
        return 0
    nodes = nodes_needed(s, cfg, a.gpus, a.nodes, a.gpu_memory * GB)
    more = f"; or {nodes} nodes of {a.gpus} GPUs as it is" if nodes else ""
    for what, c in remedies(cfg):  # none changes the model, so its shape stands
        total = estimate(s, c, a.gpus, a.nodes)["total"]
        if total <= a.gpu_memory * GB:
            print(f"does not fit: {e['total'] / GB:.1f} GB > {a.gpu_memory:g} GB per GPU. It fits with {what} "
                  f"({total / GB:.1f} GB){more}")
            return 2
    print(f"does not fit: {e['total'] / GB:.1f} GB > {a.gpu_memory:g} GB per GPU, and none of gradient "
          f"checkpointing, micro-batch 1, ZeRO-3 or CPU offload is enough{more or '; use larger GPUs or a shorter data.max_length'}")
    return 2


def nodes_needed(s: Shape, cfg: Config, gpus: int, nodes: int, memory: float) -> int | None:
    """The fewest nodes (up to 64) on which the recipe fits unchanged; None if none does."""
    return next((n for n in range(nodes + 1, 65) if estimate(s, cfg, gpus, n)["total"] <= memory), None)

if __name__ == "__main__":
    sys.exit(main())
