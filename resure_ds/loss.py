"""Per-token NLL -> per-turn losses, for a whole batch at once. Pure torch.

Shapes: B sequences, S positions, V vocab, T = max turns per sequence.
Labels are shifted, not logits: position s predicts token s+1, so the
[B, S, V] logits are never copied (the HF `ForCausalLMLoss` trick).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE = -100


def shift_targets(labels: torch.Tensor, turn_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S] labels/turn_ids -> targets aligned with logits: value at s is that of token s+1."""
    return (F.pad(labels[:, 1:], (0, 1), value=IGNORE),
            F.pad(turn_ids[:, 1:], (0, 1), value=-1))


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


class TurnLosses(NamedTuple):
    sum: torch.Tensor    # [B, T] sum of token NLL per turn (carries grad)
    count: torch.Tensor  # [B, T] trained tokens per turn (0 = turn absent)
    mean: torch.Tensor   # [B, T] float64 length-normalised loss L(d,t), detached; NaN where absent


def turn_losses(nll: torch.Tensor, turn_targets: torch.Tensor, num_turns: int) -> TurnLosses:
    """Segment sums keyed by (sequence, turn): one index_add, no loop over turns.

    nll [B, S] float, turn_targets [B, S] long (-1 = untrained) -> TurnLosses.
    Untrained positions go to a spill slot B*T that is dropped.
    """
    B, S = nll.shape
    T = num_turns
    rows = torch.arange(B, device=nll.device).unsqueeze(1) * T
    key = torch.where(turn_targets >= 0, rows + turn_targets, B * T).reshape(-1)
    sums = torch.zeros(B * T + 1, dtype=nll.dtype, device=nll.device).index_add(0, key, nll.reshape(-1))
    counts = torch.bincount(key, minlength=B * T + 1)
    sums, counts = sums[:-1].view(B, T), counts[:-1].view(B, T)
    mean = sums.detach().double() / counts.clamp(min=1)
    mean = torch.where(counts > 0, mean, torch.full_like(mean, float("nan")))
    return TurnLosses(sums, counts, mean)


def weighted_loss_sum(turns: TurnLosses, weights: torch.Tensor) -> torch.Tensor:
    """sum over turns of w(d,t) * sum_i l_i; non-finite turns contribute nothing.

    The caller divides by the global trained-token count N (METHOD.md s.5).
    """
    ok = (turns.count > 0) & torch.isfinite(turns.mean)
    w = weights.to(turns.sum.dtype)
    return torch.where(ok, w * turns.sum, torch.zeros_like(turns.sum)).sum()
