"""The training method as one stateful part: its signals' statistics (per depth, and per source and
depth), each source's reliability and, with data.mixture=adaptive, the mixture's shares; and its
rule from a micro-batch's turn losses to weights.

    method = Method(cfg, shares)          # shares: each source's configured share of the draws
    seen = method.statistic(turns, ref)   # per signal, what it sees: the turn losses, or their excess (s.8)
    w = method.weigh(seen, step, turns.count, sources)  # from the statistics as they stood (docs/method.md s.4, s.9)
    method.merge(seen, complete, dev, sources, w)        # then this micro-step's complete turns, on every rank
    method.end_step()                     # after each optimizer step: the adaptive mixture moves (s.10)

Its state is JSON (state_dict / load_state_dict), the part of a checkpoint's progress record
that is ours to restore.
"""
from __future__ import annotations

import math

import torch

from ..config import Config, two_sided
from .histogram import LossHistogram
from .sources import Mixture, SourceReliability, metric_names
from .turns import TurnLosses
from .weighting import Weights, finish, signal_weights, sft_weights, truncation_weights
from .welford import Welford, gather_merge

TRUNCATION_BINS = 4000  # loss truncation's quantile: 0.005 nats a bin over 20 nats
EXCESS_LOW = -10.0      # histograms of excess losses (stats.reference) span [-10, 10) nats


class Signal:
    """One per-turn statistic the weights see: its per-depth statistics (and histograms where the
    rule needs them) and its per-(source x depth) statistics."""

    def __init__(self, name: str, cfg: Config, num_sources: int):
        s = cfg.stats
        self.name, self.two_sided = name, two_sided(cfg, name)
        self.low = EXCESS_LOW if name == "excess" else 0.0
        self.stats = Welford(s.num_buckets, s.decay, s.length_scaled, s.scale,
                             histograms=cfg.resure.threshold == "quantile", min_loss=self.low)
        self.by_source = Welford(num_sources * s.num_buckets, s.decay)

    def values(self, turns: TurnLosses, ref: torch.Tensor | None) -> torch.Tensor:
        """[D, T] float64: the turn losses, or their excess over the reference ([D, T] `ref`)."""
        if self.name == "loss":
            return turns.mean
        if ref is None:
            raise ValueError("stats.signals holds excess but the batch carries no reference losses")
        return turns.mean - ref.to(turns.mean.device, torch.float64)

    def source_bucket(self, depth: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        k = self.stats.num_buckets
        return sources.to(depth.device).long() * k + self.stats.bucket(depth)

    def source_shift(self, num_sources: int) -> torch.Tensor:
        """[S] each source's mean standardised shift from its depth buckets: sum over buckets of
        n_sb (mean_sb - mean_b) / std_b, over sum n_sb (NaN where it has no turn or no std yet)."""
        k, st = self.stats.num_buckets, self.stats
        by = self.by_source.state.view(num_sources, k, -1).to(st.state.device)
        n, mean = by[..., 0], by[..., 1]
        std = st.std.clamp(min=1e-12)
        ok = (n > 0) & torch.isfinite(std)[None, :]
        shift = torch.where(ok, n * (mean - st.mean[None, :]) / std[None, :], torch.zeros_like(mean)).sum(1)
        tot = torch.where(ok, n, torch.zeros_like(n)).sum(1)
        return torch.where(tot > 0, shift / tot.clamp(min=1e-300), torch.full_like(tot, float("nan")))


class Method:
    def __init__(self, cfg: Config, shares: list[float] | None = None):
        self.cfg, shares = cfg, shares or [1.0]
        self.num_sources = len(shares)
        self.signals = [Signal(n, cfg, self.num_sources) for n in cfg.stats.signals]
        first = self.signals[0]
        self.hist = (LossHistogram(1, bins=TRUNCATION_BINS, min_loss=first.low, max_loss=first.low + 20.0)
                     if cfg.train.method == "loss_truncation" else None)
        self.sources = SourceReliability(self.num_sources, cfg.stats.source_decay)
        q = torch.as_tensor(shares, dtype=torch.float64)
        self.configured = q / q.sum()
        self.mixture = Mixture(shares, cfg.data.adaptive) if cfg.data.mixture == "adaptive" and len(shares) > 1 \
            else None

    @property
    def stats(self) -> Welford:
        """The first signal's per-depth statistics (bucket_* metrics, loss truncation's signal)."""
        return self.signals[0].stats

    def token_loss(self, nll: torch.Tensor) -> torch.Tensor | None:
        """What the gradient takes per token when it is not the NLL itself: DFT (train.method=dft) scales
        each token's NLL by its probability under the model, detached (exp(-nll), no gradient), so
        tokens the model finds unlikely count less. None for the other methods."""
        if self.cfg.train.method != "dft":
            return None
        return nll * torch.exp(-nll.detach())

    def statistic(self, turns: TurnLosses, ref: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per signal, what its statistics and weights see ([D, T] float64): each turn's loss, or its
        excess loss, the loss minus the reference model's on the same tokens (`ref`, from the batch).
        The turn's sum, which carries the gradient, is its own loss either way."""
        return {s.name: s.values(turns, ref) for s in self.signals}

    def weigh(self, seen: dict[str, torch.Tensor], step: int, count: torch.Tensor,
              sources: torch.Tensor | None = None) -> Weights:
        """Weights from the statistics as they stood. With several signals each gives a weight and the
        turn takes the smallest (its z is that signal's: the first where they tie)."""
        cfg, first = self.cfg, self.signals[0]
        x0 = seen[first.name]
        present = count > 0
        src = None if self.mixture is None or sources is None else \
            self.mixture.multipliers().to(x0.device, torch.float32)[sources.to(x0.device).long()]
        if cfg.train.method == "loss_truncation":
            return truncation_weights(x0, present, self.hist, cfg.loss_truncation)._replace(src=src)
        if cfg.train.method != "resure":
            out = sft_weights(x0, present, first.stats, cfg.resure.eps, count)
            if len(self.signals) > 1:
                zs = {s.name: sft_weights(seen[s.name], present, s.stats, cfg.resure.eps, count).z
                      for s in self.signals}
                out = out._replace(zs=zs)
            return out._replace(src=src)
        ws, zs, warms = {}, {}, []
        for s in self.signals:
            w, z, warm = signal_weights(seen[s.name], present, s.stats, cfg.resure, step, count, s.two_sided)
            ws[s.name], zs[s.name] = w, torch.where(warm, z, torch.full_like(z, float("nan")))
            warms.append(warm)
        stack = torch.stack([ws[s.name] for s in self.signals])
        w, which = stack.min(0)
        z = torch.gather(torch.stack([zs[s.name] for s in self.signals]), 0, which[None]).squeeze(0)
        warm = torch.stack(warms).any(0)
        many = len(self.signals) > 1
        return Weights(finish(w, present, x0, cfg.resure).float(), z, warm,
                       zs if many else None, ws if many else None, src)

    def merge(self, seen: dict[str, torch.Tensor], complete: torch.Tensor, device,
              sources: torch.Tensor | None = None, wts: Weights | None = None,
              count: torch.Tensor | None = None) -> None:
        """This micro-step's complete turns into the statistics: collectives every rank joins every
        micro-step (non-finite values are counted there, not merged). One all-gather carries every
        signal's per-depth and per-(source x depth) summaries; the histograms and the sources'
        reliability sums travel in all-reduces."""
        d, depth = torch.nonzero(complete, as_tuple=True)
        src = (torch.zeros(complete.shape[0], dtype=torch.long) if sources is None else sources.long()
               ).to(complete.device)[d]
        tokens = None if count is None else count.to(complete.device)[complete]  # stats.length_scaled weighs by them
        parts = []
        for s in self.signals:
            v = seen[s.name][complete]
            parts += [s.stats.summary(v, depth, tokens), s.by_source.summary(v, s.source_bucket(depth, src))]
        sizes = [p.shape[0] for p in parts]
        merged = gather_merge(torch.cat(parts), device).split(sizes)
        for i, s in enumerate(self.signals):
            s.stats.update(merged[2 * i])
            s.by_source.update(merged[2 * i + 1])
            if s.stats.robust is not None:
                s.stats.robust.sync_update(seen[s.name][complete], s.stats.bucket(depth), device)
        if self.hist is not None:
            v = seen[self.signals[0].name][complete]
            self.hist.sync_update(v[torch.isfinite(v)], device=device)
        if wts is not None:  # reliability: the weights of the turns weighed past the warm-up
            weighed = (wts.warm.to(complete.device) & complete)[complete]
            finite = torch.isfinite(seen[self.signals[0].name][complete])
            self.sources.sync_update(wts.w.to(complete.device)[complete], src, weighed & finite, device)

    def end_step(self) -> None:
        """After each optimizer step: the adaptive mixture moves towards its target."""
        if self.mixture is not None:
            self.mixture.update(self.sources)

    def shares(self) -> torch.Tensor:
        """[S] each source's share now: the adaptive mixture's, else the configured one."""
        return self.configured if self.mixture is None else self.mixture.shares

    def metrics(self, names: list[str] | None = None) -> dict:
        st = self.stats
        out = {"bucket_n": st.n.tolist(), "bucket_mean": st.mean.tolist(), "bucket_std": st.std.tolist(),
               "nonfinite_total": int(st.nonfinite.sum().item()),
               **({} if st.scale != "mad" else {"bucket_median": st.center.tolist(),
                                                "bucket_scale": st.spread.tolist()})}
        for s in self.signals[1:]:
            out[f"bucket_mean_{s.name}"] = s.stats.mean.tolist()
            out[f"bucket_std_{s.name}"] = s.stats.std.tolist()
        if names is None:
            return out
        turns = self.sources.total.tolist()
        rel, share = self.sources.reliability().tolist(), self.shares().tolist()
        shifts = {s.name: s.source_shift(self.num_sources).tolist() for s in self.signals}
        for i, name in enumerate(metric_names(names)):
            out[f"source/{name}/turns"] = int(turns[i])
            out[f"source/{name}/reliability"] = _finite(rel[i])
            for sig, v in shifts.items():
                out[f"source/{name}/z_{sig}"] = _finite(v[i])
            out[f"source_share/{name}"] = share[i]
        return out

    def state_dict(self) -> dict:
        return {"signals": {s.name: {"welford": s.stats.state_dict(), "by_source": s.by_source.state_dict()}
                            for s in self.signals},
                "hist": None if self.hist is None else self.hist.state_dict(),
                "sources": self.sources.state_dict(),
                "mixture": None if self.mixture is None else self.mixture.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        have, want = list(sd["signals"]), [s.name for s in self.signals]
        if have != want:
            raise ValueError(f"checkpoint's statistics are of stats.signals={have}, this run's {want}; resume with "
                             f"stats.signals={have}")
        for s in self.signals:
            s.stats.load_state_dict(sd["signals"][s.name]["welford"])
            s.by_source.load_state_dict(sd["signals"][s.name]["by_source"])
        if self.hist is not None and sd.get("hist"):
            self.hist.load_state_dict(sd["hist"])
        self.sources.load_state_dict(sd["sources"])
        if (sd.get("mixture") is None) != (self.mixture is None):
            saved = "adaptive" if sd.get("mixture") is not None else "fixed"
            raise ValueError(f"checkpoint's mixture is data.mixture={saved}, this run's {self.cfg.data.mixture}; "
                             f"resume with data.mixture={saved}")
        if self.mixture is not None:
            self.mixture.load_state_dict(sd["mixture"])


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
