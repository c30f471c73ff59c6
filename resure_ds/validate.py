"""Validation during training: the clean per-turn loss on held-out dialogues.

Every rank evaluates its share of the validation rows (one dialogue per
padded row, like `python -m resure_ds.eval`), and the per-depth sums are
all-reduced, so every rank ends with the same numbers. Under ZeRO-3 a
forward is a collective, so every rank runs the same number of forwards: a
rank with no rows left in the last round repeats a row and drops the result.
Turns cut by max_length count, as in resure_ds.eval; no weights apply.
"""
from __future__ import annotations

import numpy as np
import torch

from . import dist
from .data.collate import collate
from .loss import shift_targets, turn_losses

NLL, TOKENS, TURNS, TURN_MEANS = range(4)


class Validation:
    def __init__(self, rows: list, pad_id: int, micro_batch: int):
        if not rows:
            raise ValueError("the validation split is empty")
        self.rows, self.pad_id, self.micro_batch = rows, pad_id, micro_batch
        self.depth = max(max(len(r.partial) for r in rows), 1)  # the same on every rank
        self.dialogues = len(rows)

    @torch.no_grad()
    def run(self, engine) -> dict:
        """engine: train's ds.Engine (its device is where the forwards and the all-reduce run)."""
        rank, world, mb, dev = dist.rank(), dist.world(), self.micro_batch, engine.device
        per = world * mb
        sums = torch.zeros(self.depth, 4, dtype=torch.float64)
        engine.train(False)
        try:
            for start in range(0, len(self.rows), per):
                mine = self.rows[start + rank * mb:start + (rank + 1) * mb]
                real = bool(mine)
                batch = collate([[r] for r in (mine or self.rows[:1])], self.pad_id, packed=False)
                tg = shift_targets(batch["labels"].to(dev), batch["turn_ids"].to(dev), batch["doc_ids"].to(dev))
                t = turn_losses(engine.token_nll(batch, tg.labels), tg, len(batch["dialogue_ids"]),
                                batch["partial"].shape[1])
                if real:
                    present = (t.count > 0).double()
                    n = t.sum.shape[1]
                    sums[:n, NLL] += t.sum.double().sum(0).cpu()
                    sums[:n, TOKENS] += t.count.double().sum(0).cpu()
                    sums[:n, TURNS] += present.sum(0).cpu()
                    sums[:n, TURN_MEANS] += torch.where(t.count > 0, t.mean.double(), 0.0).sum(0).cpu()
        finally:
            engine.train(True)
        total = dist.all_reduce_sum(sums.flatten(), dev).view(self.depth, 4).numpy()
        return summarize(total, self.dialogues)


def summarize(total: np.ndarray, dialogues: int) -> dict:
    """Per-depth sums -> the metrics row's val_* fields (depth lists stop at the deepest turn seen)."""
    seen = np.flatnonzero(total[:, TURNS] > 0)
    d = int(seen[-1]) + 1 if len(seen) else 0
    t = total[:d]
    tok, turns = max(t[:, TOKENS].sum(), 1.0), max(t[:, TURNS].sum(), 1.0)
    safe = lambda a: np.where(a > 0, a, 1.0)  # noqa: E731
    return {
        "val_loss": float(t[:, NLL].sum() / tok),
        "val_turn_loss": float(t[:, TURN_MEANS].sum() / turns),
        "val_dialogues": dialogues, "val_turns": int(t[:, TURNS].sum()), "val_tokens": int(t[:, TOKENS].sum()),
        "val_depth_loss": (t[:, NLL] / safe(t[:, TOKENS])).tolist(),
        "val_depth_turn_loss": (t[:, TURN_MEANS] / safe(t[:, TURNS])).tolist(),
        "val_depth_turns": t[:, TURNS].astype(int).tolist(),
    }
