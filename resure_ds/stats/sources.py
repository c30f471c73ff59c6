"""Evidence pooled per source (docs/method.md s.10): each source's running reliability, and the
adaptive mixture that follows it.

Reliability. A turn's weight is a weak verdict; a source's running record of them is a strong one.
Per source s: n_s, the (decayed) count of its complete turns weighed past the method's warm-up,
and W_s, the (decayed) sum of their weights; r_s = W_s / n_s is the share of its turns' weight the
method kept. Every micro-step each rank adds its turns' [S, 2] sums and the ranks all-reduce them:
every rank holds the same numbers, and they do not depend on how the rows were split over ranks.

Adaptive mixture (data.mixture=adaptive). q_s, the configured share of the draws (data.train's
weights over the epoch's quotas); r = sum W / sum n, the pooled reliability; the shrunk reliability
r'_s = (W_s + m r) / (n_s + m) (m = data.adaptive.prior: a source with few turns stays near r). The
target share t_s is proportional to q_s exp(beta (r'_s - r)) (beta = data.adaptive.strength), held
within [floor * q_s, q_s / floor] (floor = data.adaptive.floor), so a source's weight p_s / q_s stays
within [floor, 1 / floor]. After every optimizer step each log-share moves
towards its target by at most data.adaptive.max_step, then the shares are renormalised (and bounded
again): the log-ratio of two sources' shares moves at most 2 * max_step a step. The shares p_s act as a weight p_s / q_s on every turn of source s: the expected gradient is
that of drawing the sources in shares p (importance weighting), while the draws themselves stay
those of data.train. Everything is a function of the all-reduced sums, so identical on every rank
and in the checkpoint as JSON.
"""
from __future__ import annotations

import math
import re

import torch

from ..config import AdaptiveConfig
from .. import dist

N, WSUM, TOTAL = 0, 1, 2


class SourceReliability:
    def __init__(self, num_sources: int, decay: float = 1.0):
        self.num_sources, self.decay = num_sources, decay
        self.state = torch.zeros(num_sources, 3, dtype=torch.float64)

    def local(self, weights: torch.Tensor, sources: torch.Tensor, weighed: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's [S, 3] (weighed turns, their weight sum, all turns) of the given complete turns'
        weights (1-D), their sources and which of them were weighed past the warm-up (default all)."""
        w = weights.detach().double().reshape(-1)
        s = sources.reshape(-1).to(w.device).long()
        m = torch.ones_like(w) if weighed is None else weighed.reshape(-1).to(w.device).double()
        out = torch.zeros(self.num_sources, 3, dtype=torch.float64, device=w.device)
        out[:, N].index_add_(0, s, m)
        out[:, WSUM].index_add_(0, s, torch.where(m > 0, w, torch.zeros_like(w)))
        out[:, TOTAL].index_add_(0, s, torch.ones_like(w))
        return out

    def update(self, combined: torch.Tensor) -> None:
        """Add the ranks' summed [S, 3] after scaling the running sums (not the total) by the decay."""
        scale = torch.tensor([self.decay, self.decay, 1.0], dtype=torch.float64, device=combined.device)
        self.state = self.state.to(combined.device) * scale + combined

    def sync_update(self, weights: torch.Tensor, sources: torch.Tensor, weighed: torch.Tensor | None = None,
                    device=None) -> None:
        self.update(dist.all_reduce_sum(self.local(weights, sources, weighed), device, to_cpu=False))

    @property
    def turns(self) -> torch.Tensor:
        """[S] weighed turns (decayed)."""
        return self.state[:, N]

    @property
    def total(self) -> torch.Tensor:
        """[S] every complete turn of the source merged so far (not decayed)."""
        return self.state[:, TOTAL]

    def reliability(self) -> torch.Tensor:
        """[S] r_s (NaN for a source with no weighed turn yet)."""
        n = self.state[:, N]
        return torch.where(n > 0, self.state[:, WSUM] / n.clamp(min=1e-300), torch.full_like(n, float("nan")))

    def pooled(self) -> float:
        n = float(self.state[:, N].sum())
        return float(self.state[:, WSUM].sum()) / n if n > 0 else float("nan")

    def state_dict(self) -> dict:
        return {"num_sources": self.num_sources, "state": self.state.cpu().tolist()}

    def load_state_dict(self, sd: dict) -> None:
        if sd["num_sources"] != self.num_sources:
            raise ValueError(f"checkpoint's source reliability covers {sd['num_sources']} sources, this run has "
                             f"{self.num_sources}")
        self.state = torch.as_tensor(sd["state"], dtype=torch.float64).reshape(self.num_sources, 3).clone()


class Mixture:
    """The adaptive shares p_s (module docstring); `configured` are the q_s."""

    def __init__(self, configured: list[float], cfg: AdaptiveConfig):
        q = torch.as_tensor(configured, dtype=torch.float64)
        self.q, self.cfg = q / q.sum(), cfg
        self.log_p = self.q.log()

    @property
    def shares(self) -> torch.Tensor:
        return self.log_p.exp()

    def multipliers(self) -> torch.Tensor:
        """[S] p_s / q_s: the weight every turn of source s trains with."""
        return self.shares / self.q

    def _bounded(self, log_t: torch.Tensor) -> torch.Tensor:
        """The shares proportional to exp(log_t), held within [floor * q, q / floor]: t = clip(exp(log_t +
        c), low, high) with the one c that makes them sum to 1, found by bisection (the sum rises with c;
        the same float64 steps on every rank)."""
        low, high = (self.cfg.floor * self.q).log(), (self.q / self.cfg.floor).log()
        x = log_t - log_t.max()

        def total(c: float) -> float:
            return float(torch.minimum(torch.maximum(x + c, low), high).exp().sum())

        lo, hi = float((low - x).min()), float((high - x).max())  # sum <= 1 at lo, >= 1 at hi
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if total(mid) < 1.0 else (lo, mid)
        t = torch.minimum(torch.maximum(x + hi, low), high).exp()
        return (t / t.sum()).log()

    def target(self, rel: SourceReliability) -> torch.Tensor:
        """log t_s from the reliability as it stands."""
        r = rel.pooled()
        if not math.isfinite(r):
            return self.q.log()
        n, wsum = rel.state[:, N].cpu(), rel.state[:, WSUM].cpu()
        # a source with no evidence (n = 0, and prior 0) stays at the pooled value: unknown, not unreliable
        shrunk = torch.where(n + self.cfg.prior > 0, (wsum + self.cfg.prior * r) / (n + self.cfg.prior).clamp(
            min=1e-300), torch.full_like(n, r))
        return self._bounded(self.q.log() + self.cfg.strength * (shrunk - r))

    def update(self, rel: SourceReliability) -> None:
        """One optimizer step's move towards the target."""
        step = (self.target(rel) - self.log_p).clamp(-self.cfg.max_step, self.cfg.max_step)
        self.log_p = self._bounded(self.log_p + step)

    def state_dict(self) -> dict:
        return {"configured": self.q.tolist(), "log_share": self.log_p.tolist()}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["log_share"]) != len(self.q):
            raise ValueError(f"checkpoint's adaptive mixture has {len(sd['log_share'])} sources, this run "
                             f"{len(self.q)}")
        self.log_p = torch.as_tensor(sd["log_share"], dtype=torch.float64).clone()


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def metric_names(names: list[str]) -> list[str]:
    """Source labels as they can stand in a metric name (every tracker: letters, digits, _ . -),
    distinct: a clash gets the source's index appended (then more, until no other name is the same)."""
    safe = [_UNSAFE.sub("_", n) or "_" for n in names]
    out: list[str] = []
    for i, s in enumerate(safe):
        name = s if safe.count(s) == 1 else f"{s}.{i}"
        while name in out or (name != s and name in safe):
            name += f".{i}"
        out.append(name)
    return out
