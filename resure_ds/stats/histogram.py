"""Histograms of turn losses, per bucket, merged exactly across ranks: the one type behind the
robust z (stats.scale=mad; beyond the paper) and loss truncation's running quantile.

Robust center and scale (stats.scale=mad).

The paper's z measures a turn against its bucket's mean and standard deviation. Those are
pulled by the very turns the method should catch: in the noisy-mix study (30% of dialogues
with one corrupted reply) the corrupted turns inflated the standard deviation so much that
their own z mostly stayed under tau. The median and the median absolute deviation (MAD)
move little with a minority of outliers.

A streaming median needs the distribution, so each bucket keeps a histogram of its turn
losses over [min_loss, max_loss) nats (losses outside count in the first or last bin; the range
is [-10, 10) for the excess losses of stats.reference, [0, 20) otherwise). Every
micro-step the ranks add their counts with one all-reduce of a fixed-shape [K, bins] tensor
(also from a rank with no turns, so none can hang); integer counts add exactly, so every
rank holds the same histogram. center_b = median, scale_b = 1.4826 * MAD (equal to the
standard deviation for a normal distribution), both read off the histogram to within a
bin (max_loss / bins, 0.01 nats by default); the scale is at least one bin wide. `decay`
scales the counts before each merge, as it scales Welford's n and M2.

Loss truncation (Kang and Hashimoto 2020) uses one bucket of 4000 bins over [0, 20) nats
(0.005 nats a bin) and reads its (1 - c) quantile as the upper edge of the bin where the
cumulative share first reaches 1 - c: a turn that shares that bin is kept (a loss exactly on a
bin edge may fall one bin apart through rounding of loss / width).
"""
from __future__ import annotations

import torch

from .. import dist

MAD_TO_STD = 1.4826  # 1 / Phi^-1(3/4): the MAD of a normal distribution times this is its sigma


class LossHistogram:
    def __init__(self, num_buckets: int = 1, bins: int = 2000, max_loss: float = 20.0, decay: float = 1.0,
                 min_loss: float = 0.0):
        self.num_buckets, self.bins, self.max_loss, self.decay = num_buckets, bins, max_loss, decay
        self.min_loss = min_loss
        self.counts = torch.zeros(num_buckets, bins, dtype=torch.float64)

    @property
    def width(self) -> float:
        return (self.max_loss - self.min_loss) / self.bins

    @property
    def total(self) -> float:
        """All counts (a host sync)."""
        return float(self.counts.sum())

    def local_counts(self, values: torch.Tensor, buckets: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's finite losses (1-D) and their buckets (default: all in bucket 0) -> [K, bins]
        counts, on their device."""
        v = values.detach().double().reshape(-1)
        b = torch.zeros_like(v, dtype=torch.long) if buckets is None else buckets.reshape(-1).to(v.device).long()
        ok = torch.isfinite(v)
        idx = ((v[ok] - self.min_loss).clamp(min=0) / self.width).long().clamp(max=self.bins - 1)
        flat = torch.bincount(b[ok] * self.bins + idx, minlength=self.num_buckets * self.bins)
        return flat.double().view(self.num_buckets, self.bins)

    def sync_update(self, values: torch.Tensor, buckets: torch.Tensor | None = None, device=None) -> None:
        c = dist.all_reduce_sum(self.local_counts(values, buckets), device, to_cpu=False)
        self.counts = self.counts.to(c.device) * self.decay + c  # kept where the losses are: no host sync

    def median(self) -> torch.Tensor:
        """[K] median per bucket, interpolated within its bin (NaN for an empty bucket)."""
        return self.min_loss + _quantile(self.counts, 0.5, self.width)

    def mad(self) -> torch.Tensor:
        """[K] median absolute deviation from the median (NaN for an empty bucket): the weighted
        median of |bin center - median| over the bins."""
        med = self.median()
        centers = self.min_loss + (torch.arange(self.bins, dtype=torch.float64, device=med.device) + 0.5) * self.width
        dev = (centers[None, :] - med[:, None]).abs()
        order = torch.argsort(dev, dim=1)
        cum = torch.cumsum(torch.gather(self.counts, 1, order), 1)
        total = cum[:, -1:]
        i = torch.searchsorted(cum, 0.5 * total).clamp(max=self.bins - 1)
        out = torch.gather(torch.gather(dev, 1, order), 1, i).squeeze(1)
        return torch.where(total.squeeze(1) > 0, out, torch.full_like(out, float("nan")))

    def quantile(self, q: float) -> torch.Tensor:
        """[K] q-quantile per bucket, interpolated within its bin (NaN for an empty bucket)."""
        return self.min_loss + _quantile(self.counts, q, self.width)

    def upper_quantile(self, q: float, bucket: int = 0) -> float:
        """Upper edge of the bin where the bucket's cumulative share first reaches q (loss truncation's
        threshold: conservative by less than one bin)."""
        cum = torch.cumsum(self.counts[bucket].cpu(), 0)
        i = int(torch.searchsorted(cum, torch.tensor(q * float(cum[-1]), dtype=torch.float64)))
        return self.min_loss + (min(i, self.bins - 1) + 1) * self.width

    def scale(self) -> torch.Tensor:
        """[K] 1.4826 * MAD, at least one bin wide."""
        return (MAD_TO_STD * self.mad()).clamp(min=self.width)

    def state_dict(self) -> dict:
        """JSON-ready: the non-zero cells only (most of a [K, bins] histogram is empty)."""
        nz = torch.nonzero(self.counts.cpu())
        vals = self.counts.cpu()[nz[:, 0], nz[:, 1]]
        return {"num_buckets": self.num_buckets, "bins": self.bins, "max_loss": self.max_loss,
                **({"min_loss": self.min_loss} if self.min_loss else {}),
                "cells": [[int(k), int(i), float(c)] for (k, i), c in zip(nz.tolist(), vals.tolist())]}

    def load_state_dict(self, sd: dict) -> None:
        low = sd.get("min_loss", 0.0)
        if (sd["bins"], low, sd["max_loss"]) != (self.bins, self.min_loss, self.max_loss):
            raise ValueError(f"checkpoint's loss histograms have {sd['bins']} bins over [{low}, {sd['max_loss']}), "
                             f"this run {self.bins} over [{self.min_loss}, {self.max_loss}) (stats.reference "
                             "changes the range); resume with the checkpoint's settings")
        if sd["num_buckets"] != self.num_buckets:
            raise ValueError(f"checkpoint's loss histograms have {sd['num_buckets']} buckets, config says "
                             f"{self.num_buckets}; resume with stats.num_buckets={sd['num_buckets']}")
        counts = torch.zeros(self.num_buckets, self.bins, dtype=torch.float64)
        for k, i, c in sd["cells"]:
            counts[k, i] = c
        self.counts = counts


def _quantile(counts: torch.Tensor, q: float, width: float) -> torch.Tensor:
    """[K, bins] counts -> [K] q-quantile, linear within the bin where the cumulative count
    reaches q of the total."""
    cum = torch.cumsum(counts, 1)
    total = cum[:, -1]
    target = (q * total)[:, None]
    i = torch.searchsorted(cum, target).clamp(max=counts.shape[1] - 1)
    before = torch.gather(cum, 1, i) - torch.gather(counts, 1, i)
    inside = torch.gather(counts, 1, i).clamp(min=1e-300)
    frac = ((target - before) / inside).clamp(0, 1)
    out = ((i.double() + frac) * width).squeeze(1)
    return torch.where(total > 0, out, torch.full_like(out, float("nan")))
