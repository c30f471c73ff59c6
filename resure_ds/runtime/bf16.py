"""bf16 matrix products computed in fp32 (model.bf16_matmul).

A CPU without bf16 instructions (AVX2 only) runs PyTorch's bf16 matrix products in a slow generic
kernel: a forward and backward of the embedded model is many times slower than in fp32
(`python benchmarks/matmul_dtype.py --step` measures it). Under `Fp32Matmul`, each matrix product whose
operands are all bf16, and each CPU attention kernel on bf16, is computed in fp32 from those very
operands and its result rounded to bf16, at fp32's speed. For a matrix product that is what a native
bf16 kernel computes (bf16 inputs, fp32 sums, a bf16 result), up to the order of the sums; the native
CPU attention kernel also rounds its softmax probabilities to bf16 before the product with the values,
which this does not. Weights, activations and gradients stay bf16. A GPU's attention kernels
(flash, memory-efficient, cuDNN, flash-attn) take no fp32 inputs and keep their bf16 arithmetic.

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
ATTENTION = {FLASH, aten._scaled_dot_product_flash_attention_for_cpu_backward.default}
PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.addbmm.default,
            aten.mv.default, aten.addmv.default, aten.dot.default, *ATTENTION}
OUT = {op.overloadpacket.out: op for op in PRODUCTS if op not in ATTENTION}  # torch.mm(a, b, out=c)
IN_PLACE = {aten.addmm_.default: aten.addmm.default, aten.baddbmm_.default: aten.baddbmm.default,
            aten.addbmm_.default: aten.addbmm.default, aten.addmv_.default: aten.addmv.default}
KEEP_FP32 = {FLASH: (1,)}  # outputs a native bf16 kernel gives in fp32 too: attention's log-sum-exp


def _up(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x


def _is_bf16(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16


def _moved(func, args) -> bool:
    """A product moves when all its tensor operands are bf16 (a mixed one fails as it would natively);
    attention when its first tensor (the query, or the output's gradient) is: its log-sum-exp is fp32."""
    if func in ATTENTION:
        return _is_bf16(args[0])
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return bool(tensors) and all(a.dtype == torch.bfloat16 for a in tensors)


class Fp32Matmul(TorchDispatchMode):
    """While active (a `with` block, on this thread and in the backward passes it starts): bf16
    products in fp32, rounded to bf16. `calls` counts the products it moved."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        into = None  # the tensor an in-place or out= form writes
        if func in IN_PLACE and _is_bf16(args[0]):
            into, func = args[0], IN_PLACE[func]
        elif func in OUT and _is_bf16(kwargs.get("out")):
            kwargs = dict(kwargs)
            into, func = kwargs.pop("out"), OUT[func]
        if func in PRODUCTS and _moved(func, args):
            self.calls += 1
            out = _rounded(func, func(*tree_map(_up, args), **tree_map(_up, kwargs)))
        else:
            out = func(*args, **kwargs)
        if into is None:
            return out
        if into.shape != out.shape:  # an out= tensor of another shape is resized, as natively
            into.resize_(out.shape)
        return into.copy_(out)


def _rounded(func, out):
    keep = KEEP_FP32.get(func, ())
    if isinstance(out, tuple):
        return tuple(o if i in keep or not isinstance(o, torch.Tensor) or o.dtype != torch.float32
                     else o.to(torch.bfloat16) for i, o in enumerate(out))
    return out.to(torch.bfloat16)


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
