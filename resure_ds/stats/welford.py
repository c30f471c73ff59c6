"""Per-bucket Welford statistics (n, mean, M2) in float64, merged exactly
across ranks.

Bucket of a turn: b = min(turn, K-1). Every micro-step each rank summarises
its finite, complete turn losses as a [K, 5] float64 tensor
(n, mean, M2, non-finite count, W), all ranks all-gather it (a fixed shape,
sent also by ranks with nothing in a bucket, so no rank can hang), and
every rank merges the gathered rows in rank order with Chan et al.'s
parallel formula. Same inputs, same order of operations: the statistics are
bit-identical on every rank.
Weights. W is the sum of the turns' weights: 1 each (W = n, the plain Welford of the paper), or,
with stats.length_scaled, each turn's trained-token count c. Mean and M2 are then the weighted
ones (mean = sum c L / W, M2 = sum c (L - mean)^2), merged by the same Chan formula with W in
place of n; under the model Var(L | c) = sigma^2 / c (a turn's loss is a mean over c tokens),
M2 / (n - 1) estimates the per-token sigma^2 without bias, and a turn's z divides by
sigma / sqrt(c) (weighting.zscores).
Cost: one all-gather of K*5 doubles per micro-step. The summaries, the
gather and the merge stay on the device the losses are on (the state moves
there at the first update): on a GPU nothing here waits for the host.
"""
from __future__ import annotations

import torch

from .. import dist
from .histogram import LossHistogram

N, MEAN, M2, NONFINITE, W = range(5)
COLUMNS = 5


def summarize(values: torch.Tensor, buckets: torch.Tensor, num_buckets: int,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """1-D losses, bucket ids and optional weights (default 1) -> [K, 5] float64 (n, mean, M2,
    non-finite count, W), on their device."""
    values = values.detach().double().reshape(-1)
    buckets = buckets.reshape(-1).to(values.device).long()
    finite = torch.isfinite(values)
    out = torch.zeros(num_buckets, COLUMNS, dtype=torch.float64, device=values.device)
    out[:, NONFINITE] = torch.bincount(buckets[~finite], minlength=num_buckets).double()
    v, b = values[finite], buckets[finite]
    n = torch.bincount(b, minlength=num_buckets).double()
    # unit weights give W = n exactly, and the same sums (a product with 1.0 is exact)
    c = torch.ones_like(v) if weights is None else weights.detach().double().reshape(-1).to(values.device)[finite]
    wsum = torch.zeros_like(n).index_add(0, b, c)
    s = torch.zeros_like(n).index_add(0, b, c * v)
    mean = torch.where(wsum > 0, s / wsum.clamp(min=1e-300), torch.zeros_like(s))
    m2 = torch.zeros_like(n).index_add(0, b, c * (v - mean[b]) ** 2)
    out[:, N], out[:, MEAN], out[:, M2], out[:, W] = n, mean, m2, wsum
    return out


def merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Chan et al. exact merge of two [K, 5] summaries, weighted by W (= n for unit weights);
    counts and non-finite counts add."""
    out = a.clone()
    w = a[:, W] + b[:, W]
    delta = b[:, MEAN] - a[:, MEAN]
    safe = w.clamp(min=1e-300)
    out[:, N] = a[:, N] + b[:, N]
    out[:, W] = w
    out[:, MEAN] = torch.where(w > 0, a[:, MEAN] + delta * b[:, W] / safe, a[:, MEAN])
    out[:, M2] = torch.where(w > 0, a[:, M2] + b[:, M2] + delta ** 2 * a[:, W] * b[:, W] / safe, a[:, M2])
    out[:, NONFINITE] = a[:, NONFINITE] + b[:, NONFINITE]
    return out


def gather_merge(local: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Combine every rank's [K, 5] summary; identical result on every rank.

    Without an initialised process group this is the identity. `device`
    is where the collective runs (CUDA for NCCL, CPU for gloo).
    """
    if dist.world() == 1:
        return local
    k = local.shape[0]
    parts = dist.all_gather_cat(local, device, to_cpu=False).split(k)  # rank order: the same merge everywhere
    total = parts[0]
    for p in parts[1:]:
        total = merge(total, p)
    return total


class Welford:
    """Running per-bucket statistics; `decay` < 1 scales n, W and M2 before each merge;
    `length_scaled`: turns weighted by their trained-token count (module docstring);
    `scale="mad"`: z's center and spread are the bucket's median and 1.4826 * MAD, from
    per-bucket loss histograms kept alongside (histogram.py); n still counts the warm-up."""

    def __init__(self, num_buckets: int = 8, decay: float = 1.0, length_scaled: bool = False, scale: str = "std",
                 histograms: bool = False, min_loss: float = 0.0):
        if num_buckets < 1 or not 0.0 < decay <= 1.0:
            raise ValueError("num_buckets >= 1 and 0 < decay <= 1 are required")
        if scale not in ("std", "mad") or (scale == "mad" and length_scaled):
            raise ValueError("stats.scale is std or mad, and mad does not combine with stats.length_scaled")
        self.num_buckets, self.decay, self.length_scaled, self.scale = num_buckets, decay, length_scaled, scale
        self.state = torch.zeros(num_buckets, COLUMNS, dtype=torch.float64)
        # per-bucket loss histograms: the robust z's median and MAD, or a per-bucket quantile threshold
        # over [min_loss, min_loss + 20) nats: min_loss < 0 for excess losses (stats.reference)
        self.robust = (LossHistogram(num_buckets, decay=decay, min_loss=min_loss, max_loss=min_loss + 20.0)
                       if scale == "mad" or histograms else None)

    def bucket(self, turn: torch.Tensor) -> torch.Tensor:
        return turn.clamp(max=self.num_buckets - 1)

    @property
    def n(self) -> torch.Tensor:
        return self.state[:, N]

    @property
    def mean(self) -> torch.Tensor:
        return self.state[:, MEAN]

    @property
    def std(self) -> torch.Tensor:
        """Sample std per bucket; NaN while n < 2."""
        n = self.state[:, N]
        return torch.where(n > 1, (self.state[:, M2] / (n - 1).clamp(min=1e-300)).sqrt(),
                           torch.full_like(n, float("nan")))

    @property
    def center(self) -> torch.Tensor:
        """What z measures a turn from, per bucket: the mean, or the median (scale=mad)."""
        return self.mean if self.scale != "mad" else self.robust.median().to(self.state.device)

    @property
    def spread(self) -> torch.Tensor:
        """What z divides by, per bucket: the std, or 1.4826 * MAD (scale=mad); NaN while n < 2."""
        if self.scale != "mad":
            return self.std
        n = self.state[:, N]
        scale = self.robust.scale().to(self.state.device)
        return torch.where(n > 1, scale, torch.full_like(scale, float("nan")))

    @property
    def nonfinite(self) -> torch.Tensor:
        return self.state[:, NONFINITE]

    def update(self, summary: torch.Tensor) -> None:
        """Merge an already combined [K, 5] batch summary."""
        if self.decay != 1.0:
            self.state[:, N] *= self.decay
            self.state[:, W] *= self.decay
            self.state[:, M2] *= self.decay
        self.state = merge(self.state.to(summary.device), summary.to(torch.float64))

    def summary(self, values: torch.Tensor, turns: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's [K, 5] summary of turn values at turn depths `turns` (with their trained-token
        counts where length_scaled), to be combined over ranks (gather_merge) and merged (update)."""
        return summarize(values, self.bucket(turns), self.num_buckets, counts if self.length_scaled else None)

    def sync_update(self, values: torch.Tensor, turns: torch.Tensor,
                    device: torch.device | str | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
        """Summarise this rank's turn losses (with their trained-token counts where length_scaled),
        combine over ranks, merge. Returns the batch summary."""
        weights = counts if self.length_scaled else None
        buckets = self.bucket(turns)
        batch = gather_merge(summarize(values, buckets, self.num_buckets, weights), device)
        self.update(batch)
        if self.robust is not None:
            self.robust.sync_update(values, buckets, device)
        return batch

    def state_dict(self) -> dict:
        """JSON-ready (checkpoints store it in progress.json)."""
        return {"num_buckets": self.num_buckets, "decay": self.decay, "length_scaled": self.length_scaled,
                "scale": self.scale, "robust": None if self.robust is None else self.robust.state_dict(),
                "state": self.state.cpu().tolist()}  # float64 -> Python floats: repr round-trips exactly

    def load_state_dict(self, sd: dict) -> None:
        if sd["num_buckets"] != self.num_buckets:
            raise ValueError(f"checkpoint has {sd['num_buckets']} Welford buckets, config says "
                             f"{self.num_buckets}; resume with stats.num_buckets={sd['num_buckets']}")
        if sd.get("length_scaled", False) != self.length_scaled:
            raise ValueError(f"checkpoint's statistics have stats.length_scaled={sd.get('length_scaled', False)}, "
                             f"config says {self.length_scaled}; resume with the checkpoint's setting")
        if sd.get("scale", "std") != self.scale:
            raise ValueError(f"checkpoint's statistics have stats.scale={sd.get('scale', 'std')}, config says "
                             f"{self.scale}; resume with the checkpoint's setting")
        if self.robust is not None and sd.get("robust") is None:
            raise ValueError("checkpoint's statistics keep no loss histograms, this run needs them "
                             "(resure.threshold=quantile); resume with the checkpoint's setting")
        if self.robust is not None:
            self.robust.load_state_dict(sd["robust"])
        state = torch.as_tensor(sd["state"], dtype=torch.float64).clone()
        self.state = state
