"""Per-token NLL from a model's logits, chunked: the logits path of the engine (runtime/fused.py
is the path that never forms logits). Pure torch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import IGNORE


class _ChunkedNLL(torch.autograd.Function):
    """NLL = logsumexp(x) - x[target], a chunk of rows at a time, fp32 inside.

    Unlike F.cross_entropy on the whole batch it never materialises
    log-probabilities for all rows ([N, V] fp32: 1.6 GB at 8 x 1024 x 49k):
    forward keeps only the per-row logsumexp, backward writes
    (softmax - onehot) * g straight into the gradient, chunk by chunk.
    Rows whose target is -100 get 0.
    """

    @staticmethod
    def forward(ctx, logits, targets, chunk_rows):
        N = logits.shape[0]
        valid = targets != IGNORE
        safe = torch.where(valid, targets, 0)  # every row gets a real target, so lse is right for all
        nll = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        for i in range(0, N, chunk_rows):
            x = logits[i:i + chunk_rows].float()
            t = safe[i:i + chunk_rows]
            # one fused log-softmax kernel per chunk; logsumexp = nll + picked logit
            nll[i:i + chunk_rows] = F.cross_entropy(x, t, reduction="none")
            lse[i:i + chunk_rows] = nll[i:i + chunk_rows] + x.gather(1, t[:, None]).squeeze(1)
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.chunk_rows = chunk_rows
        return torch.where(valid, nll, torch.zeros_like(nll))

    @staticmethod
    def backward(ctx, grad_out):
        logits, safe, valid, lse = ctx.saved_tensors
        g = torch.where(valid, grad_out.float(), torch.zeros_like(grad_out, dtype=torch.float32))
        grad = torch.empty_like(logits)
        c = ctx.chunk_rows
        for i in range(0, logits.shape[0], c):
            p = torch.exp(logits[i:i + c].float() - lse[i:i + c, None])
            p.scatter_add_(1, safe[i:i + c, None], torch.full_like(p[:, :1], -1.0))
            grad[i:i + c] = p.mul_(g[i:i + c, None])
        return grad, None, None


def token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """[B, S, V] logits, [B, S] targets -> [B, S] float32 NLL (0 where target is -100).

    Rows are upcast to fp32 a chunk at a time, so a bf16 model never needs an
    fp32 copy of the whole batch's logits.
    """
    B, S, V = logits.shape
    return _ChunkedNLL.apply(logits.reshape(B * S, V), targets.reshape(B * S), chunk_rows).view(B, S)
