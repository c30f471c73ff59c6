"""Per-token NLL -> per-turn losses, for a whole batch at once. Pure torch.

The per-token NLL itself comes from the model's forward (runtime/nll.py, runtime/fused.py).

Shapes: B rows, S positions, V vocab, D dialogues in the batch (one per row
when padded, several per row when packed), T = max turns per dialogue.
Labels are shifted, not logits: position s predicts token s+1, so the
[B, S, V] logits are never copied (the HF `ForCausalLMLoss` trick).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..data import IGNORE


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
