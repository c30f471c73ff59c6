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
from ..runtime import dist

N, WSUM = 0, 1


class SourceReliability:
    def __init__(self, num_sources: int, decay: float = 1.0):
        self.num_sources, self.decay = num_sources, decay
        self.state = torch.zeros(num_sources, 2, dtype=torch.float64)

    def local(self, weights: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """This rank's [S, 2] (turns, weight sum) of the given turn weights (1-D) and their sources."""
        w = weights.detach().double().reshape(-1)
        s = sources.reshape(-1).to(w.device).long()
        out = torch.zeros(self.num_sources, 2, dtype=torch.float64, device=w.device)
        out[:, N].index_add_(0, s, torch.ones_like(w))
        out[:, WSUM].index_add_(0, s, w)
        return out

    def update(self, combined: torch.Tensor) -> None:
        """Add the ranks' summed [S, 2] after scaling the running sums by the decay."""
        self.state = self.state.to(combined.device) * self.decay + combined

    def sync_update(self, weights: torch.Tensor, sources: torch.Tensor, device=None) -> None:
        self.update(dist.all_reduce_sum(self.local(weights, sources), device, to_cpu=False))

    @property
    def turns(self) -> torch.Tensor:
        return self.state[:, N]

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
        self.state = torch.as_tensor(sd["state"], dtype=torch.float64).reshape(self.num_sources, 2).clone()


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
        """Normalise, then hold every share within [floor * q, q / floor]: the shares past a bound are
        set to it and the others rescaled to the rest (a few rounds settle it: each fixes a source)."""
        t = (log_t - torch.logsumexp(log_t, 0)).exp()
        low, high = self.cfg.floor * self.q, self.q / self.cfg.floor
        at_low = torch.zeros_like(t, dtype=torch.bool)
        at_high = torch.zeros_like(at_low)
        for _ in range(2 * len(t)):
            t = torch.where(at_low, low, torch.where(at_high, high, t))
            free = ~(at_low | at_high)
            if not free.any():
                break
            t = torch.where(free, t / t[free].sum() * (1.0 - float(t[~free].sum())), t)
            new_low, new_high = free & (t < low), free & (t > high)
            if not (new_low.any() or new_high.any()):
                break
            at_low, at_high = at_low | new_low, at_high | new_high
        return (t / t.sum()).log()

    def target(self, rel: SourceReliability) -> torch.Tensor:
        """log t_s from the reliability as it stands."""
        r = rel.pooled()
        if not math.isfinite(r):
            return self.q.log()
        n, wsum = rel.state[:, N].cpu(), rel.state[:, WSUM].cpu()
        shrunk = (wsum + self.cfg.prior * r) / (n + self.cfg.prior).clamp(min=1e-300)
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
    distinct: a clash gets the source's index appended."""
    safe = [_UNSAFE.sub("_", n) or "_" for n in names]
    seen: dict[str, int] = {}
    for s in safe:
        seen[s] = seen.get(s, 0) + 1
    return [s if seen[s] == 1 else f"{s}.{i}" for i, s in enumerate(safe)]
