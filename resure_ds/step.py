"""One optimizer step of the recipe.

Take grad_accum micro-batches, count their trained tokens and sum the count over ranks (N, one
all-reduce); then per micro-batch: forward -> per-token NLL -> per-turn losses -> weights from the
statistics as they stood -> merge this micro-batch's complete turns into the statistics on every
rank -> backward of sum(w * data weight * NLL) / N -> step. The step's metrics travel in one all-reduce by name,
with every rank's stop request; the audit rows are read to the host after the optimizer.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch

from .config import Config
from .data import IGNORE
from .data.order import Cursor
from .report.audit import AuditLog
from . import dist
from .runtime import faults
from .runtime.clock import Clock
from .runtime.engine import Engine
from .runtime.sequence import SequenceParallel
from .runtime.stop import StopPolicy
from .stats.method import Method
from .stats.turns import TurnLosses, shift_targets, turn_losses, weighted_loss_sum
from .stats.weighting import Weights


class Stepper:
    def __init__(self, cfg: Config, engine: Engine, method: Method, audit: AuditLog, source_names: list[str],
                 rank: int = 0, sp: SequenceParallel | None = None):
        self.cfg, self.engine, self.method, self.audit = cfg, engine, method, audit
        self.source_names, self.rank = source_names, rank
        self.sp = sp if sp is not None else SequenceParallel(1, 0, 1)  # train.sequence_parallel (runtime/sequence.py)
        self.clock = Clock(engine.device)  # the step's time split
        self.skipped = engine.skipped_steps()

    def global_token_count(self, micro: list[dict]) -> int:
        """N: trained tokens of this optimizer step over all micro-batches and ranks (one all-reduce)."""
        local = sum(int((shift_targets(b["labels"], b["turn_ids"], b["doc_ids"]).labels != IGNORE).sum())
                    for b in micro) if self.sp.leader else 0  # a sequence-parallel group holds the same rows
        return int(dist.all_reduce_sum(torch.tensor([local], dtype=torch.float64), self.engine.device)[0])

    def micro_backward(self, batch: dict, step: int, global_tokens: int, acc: dict) -> tuple[TurnLosses, Weights]:
        """Forward, weights, statistics merge and backward of one micro-batch of optimizer step `step`
        (no optimizer step). Returns its turn losses and weights for the audit, which the step writes
        after the optimizer (reading them to the host here would stall a GPU before its backward)."""
        clock, dev, sp = self.clock, self.engine.device, self.sp
        tg = shift_targets(batch["labels"].to(dev), batch["turn_ids"].to(dev), batch["doc_ids"].to(dev))
        D, T = len(batch["dialogue_ids"]), batch["partial"].shape[1]
        if sp.on:  # this rank's chunk of every row; the whole rows' NLL gathered from the group
            local, tg_mine = sp.shard(batch, tg)
            nll_mine = self.engine.token_nll(local, tg_mine.labels)
            nll = sp.gather(nll_mine, tg.labels.shape[1])
        else:
            nll = nll_mine = self.engine.token_nll(batch, tg.labels)
            tg_mine = tg
        clock.mark("forward")
        faults.point("step", step, self.rank)
        turns = turn_losses(nll, tg, D, T)  # the whole rows' turns, whatever the sharding
        sources = torch.as_tensor(batch["sources"], dtype=torch.long)
        seen = self.method.statistic(turns, batch.get("ref_loss"))  # per signal: loss, excess loss
        wts = self.method.weigh(seen, step - 1, turns.count, sources)  # statistics as they stood before
        scaled = self.method.token_loss(nll_mine)  # DFT's per-token scaling; statistics and audit keep the NLL
        mine = turns if scaled is None and not sp.on else turn_losses(nll_mine if scaled is None else scaled,
                                                                       tg_mine, D, T)
        # this rank's part of sum(w * source weight * data weight * NLL) over the turns whole rows can train
        w = wts.w.to(dev) * batch["data_weight"].to(dev)
        if wts.src is not None:
            w = w * wts.src.to(dev)[:, None]
        loss_sum = weighted_loss_sum(turns._replace(sum=mine.sum), w)
        clock.mark("resure")
        self.method.merge(seen, (turns.count > 0) & ~batch["partial"].to(dev) & sp.leader, dev, sources, wts,
                          turns.count)
        clock.mark("collectives")
        self.engine.backward(loss_sum, global_tokens)
        clock.mark("backward")
        _accumulate(batch, turns, wts, loss_sum, acc, sp.leader)
        clock.mark("bookkeeping")
        return turns, wts

    def run(self, batches: Iterator[dict], step: int, stop: StopPolicy) -> tuple[dict, Cursor]:
        """Optimizer step `step` (1-based) -> its metrics row (with the ranks' stop requests) and the
        global data cursor after it."""
        t0, clock = time.perf_counter(), self.clock
        clock.start()
        micro = [next(batches) for _ in range(self.cfg.train.grad_accum)]
        waited = time.perf_counter() - t0  # ~0 when the loader workers keep ahead
        clock.mark("data")
        n_tokens = self.global_token_count(micro)
        clock.mark("collectives")
        acc: dict = {}
        done = []
        for b in micro:
            done.append((b, *self.micro_backward(b, step, max(n_tokens, 1), acc)))
            self.engine.step()  # DeepSpeed applies the optimizer at the accumulation boundary
            clock.mark("optimizer")
        method_metrics = self.method.metrics(self.source_names)  # the shares this step trained with
        self.method.end_step()  # the adaptive mixture moves for the next step
        cursor = Cursor(**micro[-1]["cursor"])  # global: the same on every rank
        # Step metrics over all ranks, and whether any rank must stop: one small all-reduce.
        g = dist.all_reduce_dict({**acc, **stop.local_request()}, device=self.engine.device)
        clock.mark("collectives")
        for b, turns, wts in done:
            if self.sp.leader:
                self.audit.add(audit_rows(step, b, turns, wts, self.source_names, self.method.signals[0].name))
        clock.mark("bookkeeping")
        dt, n, nturn = time.perf_counter() - t0, max(n_tokens, 1), max(g["turns"], 1.0)
        now = self.engine.skipped_steps()
        skipped, self.skipped = now - self.skipped, now
        row = {
            "step": step, "loss": g["nll"] / n, "weighted_loss": g["weighted_nll"] / n,
            "lr": self.engine.lr(), "grad_norm": self.engine.grad_norm(), "trained_tokens": n_tokens,
            "tokens_per_s": g["real_tokens"] / dt, "step_time_s": dt, "turns": int(g["turns"]),
            "mean_weight": g["weight_sum"] / nturn, "frac_w_lt_1": g["w_lt_1"] / nturn,
            "frac_w_lt_0.5": g["w_lt_half"] / nturn, "nonfinite_turns": int(g["nonfinite"]),
            **removed(g, self.cfg, [s.name for s in self.method.signals]),
            "stop_signal": g["stop_signal"] > 0, "stop_time": g["stop_time"] > 0, "skipped_step": skipped > 0,
            **method_metrics, "rows_seen": cursor.rows_seen, "epoch": cursor.epoch, "data_wait_s": waited,
            **clock.split(),
        }
        return row, cursor


def _accumulate(batch: dict, turns: TurnLosses, wts: Weights, loss_sum: torch.Tensor, acc: dict,
                leader: bool = True) -> None:
    """Add this micro-batch to the step's metric sums (by name, on the device: no sync here). Of a
    sequence-parallel group only the leader counts the rows; every rank its own part of the loss."""
    dev = turns.sum.device
    w_all, present, finite = wts.w.to(dev), turns.count > 0, torch.isfinite(turns.mean)
    ok = present & finite
    w = w_all[ok]
    weighed = ok & wts.warm.to(dev)
    sums = {"nll": torch.where(ok, turns.sum.detach(), torch.zeros_like(turns.sum)).sum(),
            "weighted_nll": loss_sum.detach(), "turns": ok.sum(), "weight_sum": w.sum(),
            "w_lt_1": (w < 1).sum(), "w_lt_half": (w < 0.5).sum(), "nonfinite": (present & ~finite).sum(),
            "real_tokens": (batch["doc_ids"] >= 0).sum(),
            "weighed": weighed.sum(), "removed": (1 - w_all[weighed].double()).sum()}
    for name, ws in (wts.ws or {}).items():
        sums[f"removed_{name}"] = (1 - ws.to(dev)[weighed].double()).sum()
    for k, v in sums.items():
        acc[k] = acc.get(k, 0.0) + v.double().to(dev) * (leader or k == "weighted_nll")


def removed(g: dict, cfg: Config, signals: list[str]) -> dict:
    """The share of the weighed turns' weight (past the warm-up) the rule removed this step, overall and
    per signal, beside the share it is meant to (resure.down_share, per signal, with the quantile
    threshold): docs/method.md s.9."""
    if cfg.train.method != "resure":
        return {}
    n = g["weighed"]
    out = {"weight_removed": g["removed"] / n if n else None}
    if len(signals) > 1:
        out.update({f"weight_removed_{s}": g[f"removed_{s}"] / n if n else None for s in signals})
    if cfg.resure.threshold == "quantile":
        out["down_share"] = cfg.resure.down_share
    return out


def audit_rows(step: int, batch: dict, turns: TurnLosses, wts: Weights, names: list[str],
               signal: str = "loss") -> list[dict]:
    """A micro-batch's turns (per dialogue), trained in optimizer step `step`, as audit rows: reads
    them to the host."""
    dev = turns.sum.device
    rows = torch.nonzero(turns.count > 0, as_tuple=True)
    mean, z, wv = turns.mean[rows].tolist(), wts.z.to(dev)[rows].tolist(), wts.w.to(dev)[rows].tolist()
    warm = wts.warm.to(dev)[rows].tolist()
    part = batch["partial"][rows[0].cpu(), rows[1].cpu()].tolist()
    ref = batch["ref_loss"][rows[0].cpu(), rows[1].cpu()].tolist() if "ref_loss" in batch else [None] * len(mean)
    dw = batch["data_weight"][rows[0].cpu(), rows[1].cpu()].tolist()
    src = batch["sources"]
    sw = wts.src[rows[0].cpu()].tolist() if wts.src is not None else [1.0] * len(mean)
    zs = {k: v.to(dev)[rows].tolist() for k, v in (wts.zs or {signal: wts.z}).items()}
    z_loss, z_excess = zs.get("loss", [None] * len(mean)), zs.get("excess", [None] * len(mean))
    return [{"dialogue_id": batch["dialogue_ids"][d], "source": names[src[d]], "turn": t, "loss": m,
             "z": _num(zz), "weight": ww, "warm": wm, "step": step, "partial": p, "ref_loss": r,
             "data_weight": x, "z_loss": _num(zl), "z_excess": _num(ze), "source_weight": s}
            for d, t, m, zz, ww, wm, p, r, x, zl, ze, s in zip(rows[0].tolist(), rows[1].tolist(), mean, z, wv, warm,
                                                              part, ref, dw, z_loss, z_excess, sw)]


def _num(x: float | None) -> float | None:
    return None if x is None or x != x else x
