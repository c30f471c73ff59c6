"""Models and probes for the test suite and the benchmarks, never used by a training run: small random
Llamas with a real tokenizer and template (real code paths, seconds a step), and the gathered
gradients of an engine."""
from __future__ import annotations

import torch

# Llama shapes for tests and benchmarks: (hidden, MLP, layers, heads, KV heads, head dim)
TINY = (64, 128, 2, 4, 2, 16)          # the test suite's 2-layer model: seconds per step on CPU
SMOLLM2_360M = (960, 2560, 32, 15, 5, 64)


def random_llama(src: str, out: str, shape: tuple = TINY, dtype=None, seed: int = 0) -> int:
    """A Llama of `shape` with the tokenizer and remaining config of the model folder `src`,
    initialised at random (seed) and saved to `out`: real code paths without real weights.
    Returns its parameter count."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(src)
    (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
     cfg.num_key_value_heads, cfg.head_dim) = shape
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def full_grads(engine) -> dict[str, torch.Tensor]:
    """Gathered fp32 gradients of every parameter of an Engine (call between backward and step)."""
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).detach().float().cpu().clone() for n, p in engine.module.named_parameters()}
