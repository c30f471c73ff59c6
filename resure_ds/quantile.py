"""Running loss quantile for the loss-truncation baseline (Kang and Hashimoto 2020).

A fixed histogram of turn losses over [0, max_loss) nats: the counts are
all-reduced every micro-step (a fixed-shape tensor, so no rank can hang)
and the (1 - c) quantile is read off the cumulative counts. Exact up to
the bin width (max_loss / bins, 0.005 nats by default) and identical on
every rank.
"""
from __future__ import annotations

import torch


class LossHistogram:
    def __init__(self, bins: int = 4000, max_loss: float = 20.0):
        self.bins, self.max_loss = bins, max_loss
        self.counts = torch.zeros(bins, dtype=torch.float64)

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def local_counts(self, values: torch.Tensor) -> torch.Tensor:
        v = values.detach().double().reshape(-1).cpu()
        v = v[torch.isfinite(v)]
        idx = (v / self.max_loss * self.bins).long().clamp(0, self.bins - 1)
        return torch.bincount(idx, minlength=self.bins).double()

    def sync_update(self, values: torch.Tensor, device=None) -> None:
        from . import dist

        c = dist.all_reduce_sum(self.local_counts(values), device)
        self.counts += c

    def quantile(self, q: float) -> float:
        """Upper edge of the bin where the cumulative share first reaches q."""
        cum = torch.cumsum(self.counts, 0)
        i = int(torch.searchsorted(cum, torch.tensor(q * float(cum[-1]), dtype=torch.float64)))
        return (min(i, self.bins - 1) + 1) * self.max_loss / self.bins

    def state_dict(self) -> dict:
        return {"bins": self.bins, "max_loss": self.max_loss, "counts": self.counts.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self.bins, self.max_loss, self.counts = sd["bins"], sd["max_loss"], sd["counts"].clone()
