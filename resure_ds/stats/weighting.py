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
    z: torch.Tensor     # [B, T] float64 z-score (NaN where undefined or warm-up)
    warm: torch.Tensor  # [B, T] bool: the method's weighting was active (past its warm-up)


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


def weight_fn(z: torch.Tensor, cfg: ResureConfig, tau: torch.Tensor | float | None = None) -> torch.Tensor:
    """z -> weight past the threshold tau (resure.tau, or per bucket with resure.threshold=quantile)."""
    tau = cfg.tau if tau is None else tau
    if cfg.two_sided:
        z = z.abs()
    if cfg.weight_fn == "hard":
        return (z <= tau).double()
    if cfg.weight_fn == "exp":
        return torch.exp(-cfg.lam * (z - tau).clamp(min=0))
    return torch.sigmoid(-(z - tau) / cfg.s)


def quantile_tau(stats: Welford, cfg: ResureConfig, T: int, device) -> torch.Tensor:
    """resure.threshold=quantile: per bucket, the z of its (1 - resure.down_share) loss quantile, so the
    share of a bucket past the threshold is set directly. The paper's fixed tau cannot do that: a
    cluster that is a share p of its bucket can reach at most z = sqrt((1 - p) / p) (docs/method.md
    s.4), so past p = 1 / (1 + tau^2) nothing is down-weighted, however far off the cluster is."""
    b = stats.bucket(torch.arange(T, device=stats.state.device))
    q = stats.robust.quantile(1.0 - cfg.down_share).to(stats.state.device)
    tau = (q - stats.center) / (stats.spread + cfg.eps)
    return tau[b].to(device)


def resure_weights(loss: torch.Tensor, present: torch.Tensor, stats: Welford,
                   cfg: ResureConfig, step: int, count: torch.Tensor | None = None) -> Weights:
    """docs/method.md s.4: z -> weight_fn -> propagate -> level -> floor; warm-up gives 1.
    count: trained tokens per turn (needed where stats.length_scaled)."""
    T = loss.shape[1]
    z = zscores(loss, stats, cfg.eps, count)
    nb = stats.n[stats.bucket(torch.arange(T, device=stats.state.device))].to(loss.device)
    warm = (nb >= max(cfg.min_count, 2)) & (step >= cfg.warmup_steps)
    tau = quantile_tau(stats, cfg, T, loss.device) if cfg.threshold == "quantile" else None
    w = torch.where(warm & torch.isfinite(z), weight_fn(z, cfg, tau), torch.ones_like(z))
    w = torch.where(present, w, torch.ones_like(w))
    if cfg.propagate == "forward":
        w = torch.cummin(w, dim=1).values
    if cfg.level == "sample":
        w = w.min(dim=1, keepdim=True).values.expand_as(w)
    w = w.clamp(min=cfg.floor)
    w = torch.where(present & ~torch.isfinite(loss), torch.zeros_like(w), w)
    z = torch.where(warm, z, torch.full_like(z, float("nan")))
    return Weights(w.float(), z, warm.expand_as(w))


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
