"""Turn losses + statistics (as they stood before this micro-step) -> weights.

All tensors are [B, T] (sequence, turn id); weights are constants (no grad).
Absent turns (count 0) get weight 1 so they never lower a minimum, and
contribute nothing to the loss anyway. Non-finite turn losses get weight 0.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..config import LossTruncationConfig, ResureConfig
from .histogram import LossHistogram
from .welford import Welford


class Weights(NamedTuple):
    w: torch.Tensor     # [B, T] float32 in [floor, 1]
    z: torch.Tensor     # [B, T] float64 z-score (NaN where undefined or warm-up); with several signals,
                        # the z of the signal that gave the turn its weight
    warm: torch.Tensor  # [B, T] bool: the method's weighting was active (past its warm-up)
    zs: dict | None = None   # signal -> [B, T] its z (several signals)
    ws: dict | None = None   # signal -> [B, T] its weight before propagate/level/floor (several signals)
    src: torch.Tensor | None = None  # [B] each dialogue's source weight (data.mixture=adaptive), else None


def zscores(loss: torch.Tensor, stats: Welford, eps: float, count: torch.Tensor | None = None) -> torch.Tensor:
    """z = (L - mean_b) / (std_b + eps), b = min(turn, K-1); NaN where n_b < 2. With stats.scale=mad,
    the bucket's median and 1.4826 * MAD stand for mean_b and std_b (histogram.py). With
    stats.length_scaled, std_b is a per-token std and a turn of c trained tokens is compared with
    std_b / sqrt(c): z = (L - mean_b) / (std_b / sqrt(c) + eps) (welford.py)."""
    T = loss.shape[1]
    b = stats.bucket(torch.arange(T, device=stats.state.device))
    mean = stats.center[b].to(loss.device)
    std = stats.spread[b].to(loss.device)
    if stats.length_scaled:
        std = std / count.double().clamp(min=1).sqrt()
    return (loss.double() - mean) / (std + eps)


def tail_weight(past: torch.Tensor, cfg: ResureConfig) -> torch.Tensor:
    """How far past its threshold a turn is (z - tau; <= 0: not past) -> weight, by resure.weight_fn."""
    if cfg.weight_fn == "hard":
        return (past <= 0).double()
    if cfg.weight_fn == "exp":
        return torch.exp(-cfg.lam * past.clamp(min=0))
    return torch.sigmoid(-past / cfg.s)


def quantile_tau(stats: Welford, cfg: ResureConfig, T: int, device, two_sided: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """resure.threshold=quantile: per bucket, the z of its (1 - down_share) quantile, so the share of a
    bucket past the threshold is set directly; two-sided, the z of its (1 - down_share / 2) and
    (down_share / 2) quantiles, the share split between the tails. The paper's fixed tau cannot do
    that: a cluster that is a share p of its bucket can reach at most z = sqrt((1 - p) / p) (docs/method.md
    s.4), so past p = 1 / (1 + tau^2) nothing is down-weighted, however far off the cluster is.
    Returns ([T] upper tau, [T] lower tau or None)."""
    b = stats.bucket(torch.arange(T, device=stats.state.device))
    share = cfg.down_share / 2 if two_sided else cfg.down_share

    def z_of(q: float) -> torch.Tensor:
        v = stats.robust.quantile(q).to(stats.state.device)
        return ((v - stats.center) / (stats.spread + cfg.eps))[b].to(device)

    return z_of(1.0 - share), (z_of(share) if two_sided else None)


def signal_weights(x: torch.Tensor, present: torch.Tensor, stats: Welford, cfg: ResureConfig, step: int,
                   count: torch.Tensor | None = None, two_sided: bool | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One signal's turn values [D, T] -> (weight before propagate/level/floor, z, warm), docs/method.md
    s.4: 1 in warm-up and where z is undefined; past the threshold, resure.weight_fn of how far past.
    two_sided (default resure.two_sided as a bool): the low tail counts too."""
    T = x.shape[1]
    two = bool(cfg.two_sided) if two_sided is None else two_sided
    z = zscores(x, stats, cfg.eps, count)
    nb = stats.n[stats.bucket(torch.arange(T, device=stats.state.device))].to(x.device)
    warm = (nb >= max(cfg.min_count, 2)) & (step >= cfg.warmup_steps)
    if cfg.threshold == "quantile":
        hi, lo = quantile_tau(stats, cfg, T, x.device, two)
        w = tail_weight(z - hi, cfg)
        if lo is not None:
            w = torch.minimum(w, tail_weight(lo - z, cfg))
    else:
        w = tail_weight((z.abs() if two else z) - cfg.tau, cfg)
    w = torch.where(warm & torch.isfinite(z), w, torch.ones_like(z))
    return torch.where(present, w, torch.ones_like(w)), z, warm.expand_as(w)


def finish(w: torch.Tensor, present: torch.Tensor, loss: torch.Tensor, cfg: ResureConfig) -> torch.Tensor:
    """propagate -> level -> floor; a turn whose loss is not finite gets 0."""
    if cfg.propagate == "forward":
        w = torch.cummin(w, dim=1).values
    if cfg.level == "sample":
        w = w.min(dim=1, keepdim=True).values.expand_as(w)
    w = w.clamp(min=cfg.floor)
    return torch.where(present & ~torch.isfinite(loss), torch.zeros_like(w), w)


def resure_weights(loss: torch.Tensor, present: torch.Tensor, stats: Welford,
                   cfg: ResureConfig, step: int, count: torch.Tensor | None = None,
                   two_sided: bool | None = None) -> Weights:
    """docs/method.md s.4 for one signal: z -> weight past the threshold -> propagate -> level -> floor;
    warm-up gives 1. count: trained tokens per turn (needed where stats.length_scaled)."""
    w, z, warm = signal_weights(loss, present, stats, cfg, step, count, two_sided)
    z = torch.where(warm, z, torch.full_like(z, float("nan")))
    return Weights(finish(w, present, loss, cfg).float(), z, warm)


def truncation_weights(loss: torch.Tensor, present: torch.Tensor, hist: LossHistogram,
                       cfg: LossTruncationConfig) -> Weights:
    """Loss truncation: weight 0 above the running (1 - c) quantile of all turn losses."""
    z = torch.full_like(loss, float("nan"), dtype=torch.float64)
    warm = hist.total >= max(cfg.min_count, 1)
    if not warm:
        w = torch.ones_like(loss)
    else:
        w = (loss <= hist.upper_quantile(1.0 - cfg.drop_fraction)).double()
    w = torch.where(present, w, torch.ones_like(w))
    w = torch.where(present & ~torch.isfinite(loss), torch.zeros_like(w), w)
    return Weights(w.float(), z, torch.full_like(present, warm))


def sft_weights(loss: torch.Tensor, present: torch.Tensor, stats: Welford, eps: float,
                count: torch.Tensor | None = None) -> Weights:
    """All ones (non-finite turns 0); z still reported for logging and the audit."""
    w = torch.where(present & ~torch.isfinite(loss), torch.zeros_like(loss), torch.ones_like(loss))
    z = zscores(loss, stats, eps, count)
    return Weights(w.float(), z, torch.isfinite(z))  # no weighting; "warm" = z defined
