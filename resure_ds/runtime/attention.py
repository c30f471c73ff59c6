"""Attention over packed rows that skips what packing masks (model.attn_implementation).

A packed row holds several dialogues, each with position ids from 0 (data/collate.py). Under
`sdpa` and `eager`, transformers turns restarting position ids into a dense [B, 1, S, S]
block-diagonal causal mask: every row pays attention over the whole row, and on a GPU a dense
mask keeps sdpa off its flash kernel. A kernel given the dialogues' boundaries instead attends
within each dialogue only:

  flash_attention_2  transformers' own: FlashAttention-2's varlen kernel, boundaries from the
                     position ids (needs the flash-attn package)
  varlen             ours, registered with transformers' attention interface: PyTorch's own
                     variable-length attention (torch.nn.attention.varlen, FlashAttention kernels
                     shipped with CUDA PyTorch) on a CUDA device in bf16/fp16; elsewhere (CPU,
                     fp32) sdpa once per dialogue with a causal kernel, the same numbers at a
                     kernel call per dialogue
  auto               flash_attention_2 where flash-attn imports and a CUDA device is visible, else
                     varlen where PyTorch has it and a CUDA device is visible, else sdpa (the mask:
                     on a CPU the default run keeps its numbers, and per-dialogue calls have no
                     flash kernel to gain there)

Boundaries: a dialogue starts where its position id is 0 (and every row starts one); a padded
row's tail is a pseudo-dialogue of its own, never trained, and a padded batch (one dialogue per
row, padding at the end) needs no mask under causal attention. Both `varlen` paths flatten the
batch to [B*S, H, D] with cumulative boundaries, computed once per forward (every layer gets the
same position-id tensor) and shared by all layers.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F

VARLEN = "varlen"


@functools.cache
def torch_varlen():
    """PyTorch's variable-length attention function, or None where this PyTorch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def resolve(requested: str, cuda: bool | None = None) -> str:
    """The attention implementation to load the model with (`auto` resolved for this machine)."""
    if requested != "auto":
        return requested
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if cuda and torch_varlen() is not None:
        return VARLEN
    return "sdpa"


def register() -> None:
    """Make `varlen` a name transformers' from_pretrained(attn_implementation=...) accepts. No
    mask function is registered with it, so transformers builds no mask for it."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)


_cache: list = []  # [(position-id tensor, cu_seqlens, longest)]: one forward's boundaries


def boundaries(position_ids: torch.Tensor, batch: int, length: int) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32, on the position ids' device) over the flattened [batch * length] tokens,
    and the longest dialogue. Cached for the tensor object itself (held, so never confused with a
    later one): every layer of a forward, and a checkpointed recompute, passes the same one."""
    if _cache and _cache[0][0] is position_ids:
        return _cache[0][1], _cache[0][2]
    pos = position_ids.expand(batch, length) if position_ids.shape[0] != batch else position_ids
    start = pos == 0
    start[:, 0] = True
    flat = torch.nonzero(start.reshape(-1)).flatten()
    cu = torch.cat([flat, flat.new_tensor([batch * length])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    _cache[:] = [(position_ids, cu, longest)]
    return cu, longest


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, position_ids=None, **kwargs):
    """Causal attention within each dialogue of every row. query [B, H, S, D], key/value
    [B, Hkv, S, D] -> ([B, S, H, D], None), as transformers' attention functions return."""
    B, H, S, D = query.shape
    if position_ids is None:
        position_ids = torch.arange(S, device=query.device)[None]
    cu, longest = boundaries(position_ids, B, S)
    q, k, v = (t.transpose(1, 2).reshape(B * S, t.shape[1], D) for t in (query, key, value))
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and torch_varlen() is not None:
        out = _kernel(q, k, v, cu, longest, scaling)
    else:
        out = per_dialogue(q, k, v, cu, scaling)
    return out.reshape(B, S, H, D), None


@functools.cache
def _varlen_keywords() -> frozenset:
    """The keywords this PyTorch's varlen_attn takes (they changed between releases)."""
    return frozenset(inspect.signature(torch_varlen()).parameters)


def _kernel(q, k, v, cu, longest: int, scaling):
    """PyTorch's varlen_attn, called with the keywords this release has."""
    params = _varlen_keywords()
    kw = {}
    if scaling is not None:
        if "scale" in params:
            kw["scale"] = scaling
        else:  # PyTorch 2.10 scales by 1/sqrt(D) itself
            q = q * (scaling * q.shape[-1] ** 0.5)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    if "is_causal" in params:  # PyTorch 2.10
        kw["is_causal"] = True
    else:  # later: causal is a window reaching back without limit and not ahead
        kw["window_size"] = (-1, 0)
    return torch_varlen()(q, k, v, cu, cu, longest, longest, **kw)


def per_dialogue(q, k, v, cu, scaling) -> torch.Tensor:
    """The same attention as sdpa, one causal call per dialogue: [T, H, D] in and out."""
    ends = cu.tolist()
    gqa = q.shape[1] != k.shape[1]
    parts = [F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                            is_causal=True, scale=scaling, enable_gqa=gqa).transpose(0, 1)
             for a, b in zip(ends[:-1], ends[1:])]
    return torch.cat(parts, 0)
