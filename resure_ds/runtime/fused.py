"""The LM head and the per-token NLL in one step, without the [tokens, vocab] logits. Pure torch.

A causal LM's last layer turns hidden states [N, H] into logits [N, V]; with
SmolLM2's V = 49,152 that is 3.2 GB in fp32 at 8 x 2048 tokens, and its
gradient as much again, for a loss that needs one number per token. Here
the head and the NLL run a chunk of rows at a time: forward keeps only each
row's logsumexp, backward recomputes the chunk's logits and writes its share
of the hidden-state and weight gradients (the idea of Liger's fused linear
cross-entropy and Apple's cut-cross-entropy, in plain torch so it runs on
any device).

Only rows that are trained (target != -100) enter the head at all: user
turns, system prompts and padding cost nothing here. With chitchat about
two thirds of the tokens are not trained, which pays for the recomputation
several times over.

The cost: one extra [rows, H] x [H, V] matmul per chunk in backward.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE

CHUNK_BYTES = 256 * 2 ** 20  # fp32 logits of one chunk; its softmax in backward takes as much again


def chunk_rows(vocab: int) -> int:
    return max(128, CHUNK_BYTES // (4 * vocab))


class _LinearNLL(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None, targets [N] -> NLL [N] float32 (0 where -100)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, idx):
        N = hidden.shape[0]
        h, t = hidden.index_select(0, idx), targets.index_select(0, idx)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=hidden.device)
        picked = torch.empty_like(lse)
        for i in range(0, h.shape[0], rows):
            z = F.linear(h[i:i + rows], weight, bias).float()
            lse[i:i + rows] = torch.logsumexp(z, dim=1)
            picked[i:i + rows] = z.gather(1, t[i:i + rows, None]).squeeze(1)
        ctx.save_for_backward(h, weight, bias, t, idx, lse)
        ctx.rows, ctx.n = rows, N
        out = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        return out.index_copy_(0, idx, lse - picked)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, t, idx, lse = ctx.saved_tensors
        g = grad_out.float().index_select(0, idx)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        r = ctx.rows
        for i in range(0, h.shape[0], r):
            hc = h[i:i + r]
            p = F.linear(hc, weight, bias).float().sub_(lse[i:i + r, None]).exp_()  # softmax
            p.scatter_add_(1, t[i:i + r, None], torch.full_like(p[:, :1], -1.0))  # - onehot
            p.mul_(g[i:i + r, None])  # d(sum g * nll) / d logits
            pc = p.to(h.dtype)
            if need_h:
                grad_h[i:i + r] = pc @ weight
            if need_w:  # fp32 accumulation across chunks; each chunk's product in the model's dtype
                if pc.dtype == torch.float32:
                    grad_w.addmm_(pc.t(), hc)
                else:
                    grad_w += (pc.t() @ hc).float()
            if need_b:
                grad_b += p.sum(0)
        grad_hidden = None
        if need_h:
            grad_hidden = torch.zeros((ctx.n, h.shape[1]), dtype=h.dtype, device=h.device).index_copy_(0, idx, grad_h)
        return (grad_hidden, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def trained_rows(targets: torch.Tensor) -> torch.Tensor:
    """Flat indices of the positions with a target. A sync point on a GPU (its size is data), so
    the fused forward takes it before the model runs, while the device has little queued."""
    return torch.nonzero(targets.reshape(-1) != IGNORE).squeeze(1)


def linear_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               targets: torch.Tensor, rows: int | None = None, idx: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S, H] hidden states, [V, H] head weight, [B, S] targets -> [B, S] float32 NLL of each
    target under softmax(hidden @ weight.T + bias); 0 where the target is -100.
    idx: trained_rows(targets), if already taken."""
    B, S, H = hidden.shape
    rows = rows or chunk_rows(weight.shape[0])
    idx = trained_rows(targets) if idx is None else idx
    return _LinearNLL.apply(hidden.reshape(B * S, H), weight, bias, targets.reshape(B * S), rows, idx).view(B, S)


class FusedHead(nn.Module):
    """Stands in for the model's nn.Linear LM head, holding the same parameters (so tied
    embeddings stay tied, and checkpoints and exports keep their names). Called with targets it
    returns per-token NLL; without, logits, as the Linear did."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None,
                idx: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return F.linear(hidden, self.weight, self.bias)
        return linear_nll(hidden, self.weight, self.bias, targets, idx=idx)


def fusable(model: nn.Module) -> str | None:
    """Why the fused head cannot stand in for this model's head (None: it can be tried; the
    start-up check in engine.py then compares it with the model's own logits)."""
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        return f"its output layer is a {type(model.get_output_embeddings()).__name__}, not a Linear"
    if getattr(model, "base_model", model) is model:
        return "it has no separate base model to give hidden states"
    return None


def install(model: nn.Module) -> None:
    """Swap in the FusedHead and give model.forward a `targets=` keyword: with it, the base model's
    hidden states go straight into the fused head and the output is per-token NLL [B, S]; without
    it, the model's own forward runs unchanged (validation, generation, the start-up checks).
    The swap happens before DeepSpeed wraps the model, so under ZeRO-3 the head's weight is
    gathered by the FusedHead module's own hooks, in forward and again in backward."""
    model.set_output_embeddings(FusedHead(model.get_output_embeddings()))
    own_forward = model.forward

    def forward(self, *args, targets: torch.Tensor | None = None, **kwargs):
        if targets is None:
            return own_forward(*args, **kwargs)
        idx = trained_rows(targets)  # before the model's kernels are queued: no wait on them
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        return self.get_output_embeddings()(hidden, targets, idx)

    model.forward = types.MethodType(forward, model)
