"""Before a job is queued: what a recipe will need per GPU, and whether it fits.

    resure-ds plan RECIPE [key=value ...] [--gpus 8] [--gpu-memory 80] [--nodes 1] [--config DIR]

The model is built on PyTorch's meta device from its config.json (no weights are read; --config
names a folder holding the config.json of a model that is not here, e.g. tests/fixtures/
architectures/llama3.1-8b), so an 8B or 70B recipe is planned on a laptop. Per GPU: model states,
DeepSpeed's buffers, activations and the CUDA context (resure_ds/runtime/memory.py says how each
is counted); the total against --gpu-memory (GB = 10^9 bytes); past it, the first change of a
fixed list that fits is named, and the exit status is 2. train.zero_stage=auto is resolved as the
recipe would on such GPUs.

Also: tokens per optimizer step (packed rows: an upper bound) and, when the corpus is already
prepared, optimizer steps per epoch.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace

from .config import CLONE, Config, ConfigError, load_config, positive, recipe_parser, split_recipe_args
from .config.parse import train_specs
from .data.manifest import read_manifest
from .data.prepare import prepared_folder, tokenizer_fingerprints
from .data.sources import resolve
from .errors import USER_ERRORS, DataError, say_error
from .models import load_tokenizer, resolve_model_path
from .runtime.memory import GB, Shape, choose_stage, estimate, model_shape, offload



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
        c = replace(c, train=replace(c.train, ds_config=os.path.join(CLONE, "recipes", "ds_offload.json")))
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
            tokens += read_manifest(folder)["counts"]["tokens"]  # local, or in an object store
    except (OSError, DataError, ValueError):
        return "n/a (the corpus is not prepared yet: resure-ds prepare RECIPE)"
    return f"about {tokens / tokens_per_step:,.0f} ({tokens:,} prepared tokens; packed rows)"


def main(argv: list[str] | None = None) -> int:
    ap = recipe_parser(__doc__)
    ap.add_argument("--gpus", type=positive(int), default=8, help="GPUs per node (default 8)")
    ap.add_argument("--gpu-memory", type=positive(float, most=1e6), default=80.0,
                    help="memory per GPU in GB (default 80; at most 10^6)")
    ap.add_argument("--nodes", type=positive(int), default=1, help="nodes (default 1)")
    ap.add_argument("--config", default=None, help="a folder with the model's config.json (default: model.path)")
    a = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(*split_recipe_args(a.args))
        where = a.config or resolve_model_path(cfg.model.path)
        if not os.path.exists(os.path.join(where, "config.json")):
            raise ConfigError(f"{where}: no config.json; give --config DIR (a folder holding the model's "
                              "config.json) for a model that is not here")
        s = model_shape(where, cfg)
    except USER_ERRORS as e:
        return say_error(str(e))
    world = a.gpus * a.nodes
    if cfg.train.zero_stage == "auto":
        stage, why = choose_stage(s, cfg, a.gpus, a.nodes, a.gpu_memory * GB)
        cfg = replace(cfg, train=replace(cfg.train, zero_stage=stage))
        print(f"zero stage   train.zero_stage=auto: ZeRO-{stage}, {why}")
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
