"""Per-token NLL -> per-turn losses, for a whole batch at once. Pure torch.

Shapes: B rows, S positions, V vocab, D dialogues in the batch (one per row
when padded, several per row when packed), T = max turns per dialogue.
Labels are shifted, not logits: position s predicts token s+1, so the
[B, S, V] logits are never copied (the HF `ForCausalLMLoss` trick).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import IGNORE


class Targets(NamedTuple):
    """What position s predicts: the label, turn id and dialogue slot of token s+1 ([B, S] each)."""
    labels: torch.Tensor
    turn: torch.Tensor
    doc: torch.Tensor


def shift_targets(labels: torch.Tensor, turn_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> Targets:
    """[B, S] labels, turn ids and dialogue slots (default: one dialogue per row) -> Targets.

    In a packed row the last token of a dialogue would predict the first token of the next
    one: that target is ignored (it is never a trained token anyway; this makes it certain).
    """
    if doc_ids is None:
        doc_ids = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)

    def shift(x, fill):
        return F.pad(x[:, 1:], (0, 1), value=fill)

    doc = shift(doc_ids, -1)
    same = doc == doc_ids
    return Targets(torch.where(same, shift(labels, IGNORE), IGNORE), torch.where(same, shift(turn_ids, -1), -1), doc)


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
    sum: torch.Tensor    # [D, T] sum of token NLL per turn (carries grad)
    count: torch.Tensor  # [D, T] trained tokens per turn (0 = turn absent)
    mean: torch.Tensor   # [D, T] float64 length-normalised loss L(d,t), detached; NaN where absent


def turn_losses(nll: torch.Tensor, tgt: Targets, num_docs: int, num_turns: int) -> TurnLosses:
    """Segment sums keyed by (dialogue, turn): one index_add, no loop over turns.

    nll [B, S] float, tgt from shift_targets -> TurnLosses [D, T]. Padded or packed alike.
    Untrained positions go to a spill slot D*T that is dropped.
    """
    D, T = num_docs, num_turns
    key = torch.where(tgt.turn >= 0, tgt.doc * T + tgt.turn, D * T).reshape(-1)
    sums = torch.zeros(D * T + 1, dtype=nll.dtype, device=nll.device).index_add(0, key, nll.reshape(-1))
    counts = torch.bincount(key, minlength=D * T + 1)
    sums, counts = sums[:-1].view(D, T), counts[:-1].view(D, T)
    mean = sums.detach().double() / counts.clamp(min=1)
    mean = torch.where(counts > 0, mean, torch.full_like(mean, float("nan")))
    return TurnLosses(sums, counts, mean)


def weighted_loss_sum(turns: TurnLosses, weights: torch.Tensor) -> torch.Tensor:
    """sum over turns of w(d,t) * sum_i l_i; non-finite turns contribute nothing.

    The caller divides by the global trained-token count N (docs/method.md s.5).
    """
    ok = (turns.count > 0) & torch.isfinite(turns.mean)
    w = weights.to(turns.sum.dtype)
    return torch.where(ok, w * turns.sum, torch.zeros_like(turns.sum)).sum()
