"""Rows of dialogues -> a batch with per-(dialogue, turn) bookkeeping.

A row holds one dialogue (padded batches) or several (packed batches); every
dialogue of the batch gets a slot d. Tensors (B rows, S = longest row,
D dialogues, T = most turns):
  input_ids [B, S] long, labels [B, S] long (-100 untrained),
  turn_ids [B, S] long (-1 untrained), doc_ids [B, S] long (dialogue slot,
  -1 padding), partial [D, T] bool (turn cut by max_length),
  data_weight [D, T] float32 (the records' per-turn data weights, 1 where none),
  dialogue_ids: D strings, sources: D source indices;
  padded:  attention_mask [B, S] (1 = token, 0 = padding);
  packed:  position_ids [B, S], restarting at 0 for every dialogue, and no
           attention mask: the model confines attention to each dialogue
           (transformers builds a block-diagonal causal mask from restarting
           position ids for sdpa/eager; flash-attention 2 runs varlen).
A turn is present where it has trained tokens (loss.turn_losses counts them).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch

from . import IGNORE


class Dlg(Protocol):  # render.Example and shards.Row both qualify; a Row may carry ref_loss too
    dialogue_id: str
    input_ids: np.ndarray
    turn_ids: np.ndarray
    partial: np.ndarray


def collate(rows: Sequence[Sequence[Dlg]], pad_id: int, packed: bool,
            sources: Sequence[Sequence[int]] | None = None) -> dict:
    """Rows of dialogues (and each dialogue's source index) -> the batch described above."""
    B = len(rows)
    S = max(sum(len(d.input_ids) for d in row) for row in rows)
    dlgs = [d for row in rows for d in row]
    T = max(max(len(d.partial) for d in dlgs), 1)
    ids = np.full((B, S), pad_id, dtype=np.int64)
    turn = np.full((B, S), -1, dtype=np.int64)
    doc = np.full((B, S), -1, dtype=np.int64)
    pos = np.zeros((B, S), dtype=np.int64)
    partial = np.zeros((len(dlgs), T), dtype=bool)
    data_weight = np.ones((len(dlgs), T), dtype=np.float32)
    refs = [getattr(d, "ref_loss", None) for d in dlgs]
    ref = np.full((len(dlgs), T), np.nan) if any(r is not None for r in refs) else None
    slot = 0
    for b, row in enumerate(rows):
        at = 0
        for d in row:
            n = len(d.input_ids)
            ids[b, at:at + n] = d.input_ids
            turn[b, at:at + n] = d.turn_ids
            doc[b, at:at + n] = slot
            pos[b, at:at + n] = np.arange(n)
            partial[slot, :len(d.partial)] = d.partial
            w = getattr(d, "weights", None)
            if w is not None:
                data_weight[slot, :min(T, len(w))] = w[:T]
            if ref is not None and refs[slot] is not None:
                ref[slot, :len(refs[slot])] = refs[slot]
            at, slot = at + n, slot + 1
        pos[b, at:] = np.arange(S - at)  # padding: one more pseudo-dialogue, never trained
    labels = np.where(turn >= 0, ids, IGNORE)
    batch = {
        "input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
        "turn_ids": torch.from_numpy(turn), "doc_ids": torch.from_numpy(doc),
        "partial": torch.from_numpy(partial), "data_weight": torch.from_numpy(data_weight),
        "dialogue_ids": [d.dialogue_id for d in dlgs],
        "sources": [s for row in sources for s in row] if sources is not None else [0] * len(dlgs),
    }
    if ref is not None:
        batch["ref_loss"] = torch.from_numpy(ref)
    if packed:
        batch["position_ids"] = torch.from_numpy(pos)
    else:
        batch["attention_mask"] = torch.from_numpy((doc >= 0).astype(np.int64))
    return batch


def collate_examples(examples: Sequence[Dlg], pad_id: int) -> dict:
    """One dialogue per row, padded (evaluation and tests)."""
    return collate([[e] for e in examples], pad_id, packed=False)
