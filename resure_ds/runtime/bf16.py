"""bf16 matrix products computed in fp32 (model.bf16_matmul).

A CPU without bf16 instructions (AVX2 only) runs PyTorch's bf16 matrix products in a slow generic
kernel: a forward and backward of the embedded model is many times slower than in fp32
(`python benchmarks/matmul_dtype.py --step` measures it). Under `Fp32Matmul`, each matrix product and each
attention kernel whose operands are bf16 is computed in fp32 from those very operands and its result
rounded to bf16: what a native bf16 kernel computes (bf16 inputs, fp32 sums, a bf16 result), up to the
order of the sums, at fp32's speed. Weights, activations and gradients stay bf16.

It works below autograd (a dispatch mode): autograd records the bf16 product as usual, and the
products of its backward pass through the mode as well, those of an autograd.Function's own backward
(the fused head) and of recomputed activations (gradient checkpointing) included.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten
FLASH = aten._scaled_dot_product_flash_attention_for_cpu.default
PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.addbmm.default,
            aten.mv.default, aten.addmv.default, aten.dot.default, FLASH,
            aten._scaled_dot_product_flash_attention_for_cpu_backward.default}
IN_PLACE = {aten.addmm_.default: aten.addmm.default, aten.baddbmm_.default: aten.baddbmm.default,
            aten.addbmm_.default: aten.addbmm.default, aten.addmv_.default: aten.addmv.default}
KEEP_FP32 = {FLASH: (1,)}  # outputs a native bf16 kernel gives in fp32 too: attention's log-sum-exp


def _up(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x


def _is_bf16(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16


class Fp32Matmul(TorchDispatchMode):
    """While active (a `with` block, on this thread and in the backward passes it starts): bf16
    products in fp32, rounded to bf16. `calls` counts the products it moved."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        into = None
        if func in IN_PLACE and _is_bf16(args[0]):
            into, func = args[0], IN_PLACE[func]
        if func not in PRODUCTS or not any(_is_bf16(a) for a in args):
            return func(*args, **kwargs)
        self.calls += 1
        out = func(*tree_map(_up, args), **tree_map(_up, kwargs))
        keep = KEEP_FP32.get(func, ())
        if isinstance(out, tuple):
            out = tuple(o if i in keep or not isinstance(o, torch.Tensor) or o.dtype != torch.float32
                        else o.to(torch.bfloat16) for i, o in enumerate(out))
        else:
            out = out.to(torch.bfloat16)
        return into.copy_(out) if into is not None else out


def resolve(setting: str, dtype: str, native_bf16: bool) -> str:
    """model.bf16_matmul for a run in `dtype`: native or fp32 (only bf16 runs have products to move;
    auto moves them where the hardware has no bf16 instructions)."""
    if dtype != "bf16":
        return "native"
    if setting == "auto":
        return "native" if native_bf16 else "fp32"
    return setting


def products(resolved: str) -> contextlib.AbstractContextManager:
    """The context every bf16 computation of a run enters: Fp32Matmul, or nothing (native)."""
    return Fp32Matmul() if resolved == "fp32" else contextlib.nullcontext()
