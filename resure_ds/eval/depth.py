"""Per turn depth sums of a clean (unweighted) loss: the one aggregation behind validation during
training (eval/validation.py) and offline evaluation (eval/offline.py).

A [depth, 4] float64 table: summed token NLL, trained tokens, turns, and summed turn means. Sums
add across batches and ranks (validation all-reduces the table), so any split gives the same
result. Turns cut by max_length count; no weights apply.
"""
from __future__ import annotations

import numpy as np

from ..stats.turns import TurnLosses

NLL, TOKENS, TURNS, TURN_MEANS = range(4)


class DepthSums:
    def __init__(self, depth: int = 0):
        self.table = np.zeros((depth, 4))

    def add(self, turns: TurnLosses) -> None:
        """Every present turn of a batch's TurnLosses (reads them to the host)."""
        count = turns.count.detach().cpu().numpy()
        d, t = np.nonzero(count > 0)
        if len(t) and t.max() >= len(self.table):  # grows only when not fixed for an all-reduce
            self.table = np.concatenate([self.table, np.zeros((t.max() + 1 - len(self.table), 4))])
        nll = turns.sum.detach().double().cpu().numpy()[d, t]
        mean = turns.mean.detach().double().cpu().numpy()[d, t]
        for col, v in ((NLL, nll), (TOKENS, count[d, t]), (TURNS, np.ones(len(t))), (TURN_MEANS, mean)):
            np.add.at(self.table[:, col], t, v)

    def summary(self) -> dict:
        """loss (token mean), turn_loss (mean of turn means), turns, tokens, and per depth up to
        the deepest turn seen: depth_loss, depth_turn_loss, depth_turns."""
        seen = np.flatnonzero(self.table[:, TURNS] > 0)
        t = self.table[:int(seen[-1]) + 1 if len(seen) else 0]
        tok, turns = max(t[:, TOKENS].sum(), 1.0), max(t[:, TURNS].sum(), 1.0)
        safe = lambda a: np.where(a > 0, a, 1.0)  # noqa: E731
        return {
            "loss": float(t[:, NLL].sum() / tok), "turn_loss": float(t[:, TURN_MEANS].sum() / turns),
            "turns": int(t[:, TURNS].sum()), "tokens": int(t[:, TOKENS].sum()),
            "depth_loss": (t[:, NLL] / safe(t[:, TOKENS])).tolist(),
            "depth_turn_loss": (t[:, TURN_MEANS] / safe(t[:, TURNS])).tolist(),
            "depth_turns": t[:, TURNS].astype(int).tolist(),
        }


def summarize(table: np.ndarray, dialogues: int) -> dict:
    """A validation table -> the metrics row's val_* fields."""
    s = DepthSums()
    s.table = table
    return {"val_dialogues": dialogues, **{f"val_{k}": v for k, v in s.summary().items()}}
