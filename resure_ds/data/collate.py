"""Padded batches with per-turn bookkeeping.

Batch tensors (B sequences, S = longest sequence, T = most turns):
  input_ids [B, S] long, attention_mask [B, S] long, labels [B, S] long
  (-100 untrained), turn_ids [B, S] long (-1 untrained), partial [B, T]
  bool (turn cut by max_length); dialogue_ids: list of B strings.
  A turn is present where it has trained tokens (loss.turn_losses counts them).
"""
from __future__ import annotations

import torch

from .render import IGNORE, Example


def collate(examples: list[Example], pad_id: int) -> dict:
    B = len(examples)
    S = max(len(e.input_ids) for e in examples)
    T = max(len(e.partial) for e in examples)
    batch = {
        "input_ids": torch.full((B, S), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((B, S), dtype=torch.long),
        "labels": torch.full((B, S), IGNORE, dtype=torch.long),
        "turn_ids": torch.full((B, S), -1, dtype=torch.long),
        "partial": torch.zeros((B, T), dtype=torch.bool),
        "dialogue_ids": [e.dialogue_id for e in examples],
    }
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        batch["input_ids"][b, :n] = torch.tensor(e.input_ids)
        batch["attention_mask"][b, :n] = 1
        batch["labels"][b, :n] = torch.tensor(e.labels)
        batch["turn_ids"][b, :n] = torch.tensor(e.turn_ids)
        batch["partial"][b, : len(e.partial)] = torch.tensor(e.partial)
    return batch
