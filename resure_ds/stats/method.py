"""The training method as one stateful part: its statistics (Welford buckets, plus a loss
histogram for loss truncation) and its rule from a micro-batch's turn losses to weights.

    method = Method(cfg)
    seen = method.statistic(turns, ref)  # the turn losses, or their excess over a reference (s.8)
    w = method.weigh(seen, step)         # from the statistics as they stood (docs/method.md s.4)
    method.merge(seen, complete, dev)    # then this micro-step's complete turns, on every rank

Its state is JSON (state_dict / load_state_dict), the part of a checkpoint's progress record
that is ours to restore.
"""
from __future__ import annotations

import torch

from ..config import Config
from .histogram import LossHistogram
from .turns import TurnLosses
from .weighting import Weights, resure_weights, sft_weights, truncation_weights
from .welford import Welford

TRUNCATION_BINS = 4000  # loss truncation's quantile: 0.005 nats a bin over 20 nats
EXCESS_LOW = -10.0      # histograms of excess losses (stats.reference) span [-10, 10) nats


class Method:
    def __init__(self, cfg: Config):
        self.cfg, s = cfg, cfg.stats
        low = EXCESS_LOW if s.reference is not None else 0.0
        self.stats = Welford(s.num_buckets, s.decay, s.length_scaled, s.scale,
                             histograms=cfg.resure.threshold == "quantile", min_loss=low)
        self.hist = (LossHistogram(1, bins=TRUNCATION_BINS, min_loss=low, max_loss=low + 20.0)
                     if cfg.train.method == "loss_truncation" else None)

    def token_loss(self, nll: torch.Tensor) -> torch.Tensor | None:
        """What the gradient takes per token when it is not the NLL itself: DFT (train.method=dft) scales
        each token's NLL by its probability under the model, detached (exp(-nll), no gradient), so
        tokens the model finds unlikely count less. None for the other methods."""
        if self.cfg.train.method != "dft":
            return None
        return nll * torch.exp(-nll.detach())

    def statistic(self, turns: TurnLosses, ref: torch.Tensor | None) -> TurnLosses:
        """What the statistics and the weights see: each turn's loss, or with stats.reference its excess
        loss, the loss minus the reference model's on the same tokens ([D, T] `ref`, from the batch).
        The sum, which carries the gradient, is the turn's own loss either way."""
        if self.cfg.stats.reference is None:
            return turns
        if ref is None:
            raise ValueError("stats.reference is set but the batch carries no reference losses")
        return turns._replace(mean=turns.mean - ref.to(turns.mean.device, torch.float64))

    def weigh(self, turns: TurnLosses, step: int) -> Weights:
        cfg, present = self.cfg, turns.count > 0
        if cfg.train.method == "resure":
            return resure_weights(turns.mean, present, self.stats, cfg.resure, step, turns.count)
        if cfg.train.method == "loss_truncation":
            return truncation_weights(turns.mean, present, self.hist, cfg.loss_truncation)
        return sft_weights(turns.mean, present, self.stats, cfg.resure.eps, turns.count)

    def merge(self, turns: TurnLosses, complete: torch.Tensor, device) -> None:
        """This micro-step's complete turns into the statistics: a collective every rank joins every
        micro-step (non-finite losses are counted there, not merged)."""
        depth = torch.nonzero(complete, as_tuple=True)[1]
        self.stats.sync_update(turns.mean[complete], depth, device, turns.count[complete])
        if self.hist is not None:
            self.hist.sync_update(turns.mean[complete & torch.isfinite(turns.mean)], device=device)

    def metrics(self) -> dict:
        st = self.stats
        return {"bucket_n": st.n.tolist(), "bucket_mean": st.mean.tolist(), "bucket_std": st.std.tolist(),
                "nonfinite_total": int(st.nonfinite.sum().item()),
                **({} if st.scale != "mad" else {"bucket_median": st.center.tolist(),
                                                 "bucket_scale": st.spread.tolist()})}

    def state_dict(self) -> dict:
        return {"welford": self.stats.state_dict(), "hist": None if self.hist is None else self.hist.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.stats.load_state_dict(sd["welford"])
        if self.hist is not None and sd.get("hist"):
            self.hist.load_state_dict(sd["hist"])
