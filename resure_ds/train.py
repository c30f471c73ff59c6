"""The recipe: setup -> train -> save_checkpoint -> cleanup.

    bash launch/train.sh [RECIPE] [key=value ...]          # starts the deepspeed launcher
    deepspeed --num_gpus 2 -m resure_ds.train RECIPE key=value ...

One optimizer step: take grad_accum micro-batches, count their trained
tokens and sum the count over ranks (N, one all-reduce); then per
micro-batch: forward -> per-token NLL -> per-turn losses -> weights from
the statistics as they stood -> merge this micro-batch's complete turns
into the statistics on every rank (one all-gather) -> backward of
sum(w * NLL) / N -> step.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from . import checkpoint as ckpt
from . import engine as ds
from .config import Config, load_config, split_recipe_args, to_dict
from .data.loader import RankBatches, make_loader
from .data.plan import Cursor
from .errors import IGNORE, ConfigError, DataError
from .loss import TurnLosses, shift_targets, token_nll, turn_losses, weighted_loss_sum
from .metrics import Audit, MetricsLogger
from .models import load_tokenizer, resolve_model_path
from .prepare import Prepared, ensure_prepared
from .quantile import LossHistogram
from .weighting import Weights, resure_weights, sft_weights, truncation_weights
from .welford import Welford


PACKING_TOLERANCE = 0.05  # bf16 noise is ~1e-2 of the logit scale; a leak changes logits by O(1)


def print0(*args, rank: int = 0) -> None:
    if rank == 0:
        print("[resure_ds]", *args, file=sys.stderr, flush=True)


@dataclass
class Run:
    cfg: Config
    rank: int
    world: int
    run_dir: str
    ckpt_dir: str
    tokenizer: Any
    engine: ds.Engine
    prepared: list[Prepared]
    stats: Welford
    hist: LossHistogram | None
    audit: Audit
    resume_from: ckpt.Found | None = None
    batches: Iterator[dict] | None = None
    cursor: Cursor = field(default_factory=Cursor)
    logger: MetricsLogger | None = None
    step: int = 0
    startup: dict = field(default_factory=dict)  # seconds spent in each phase before the first step

    @property
    def source_names(self) -> list[str]:
        return [p.spec.label for p in self.prepared]


# -- setup ------------------------------------------------------------------
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def setup(cfg: Config) -> Run:
    t0 = time.perf_counter()
    rank, world = ds.init_distributed()
    run_dir = os.path.join(cfg.output.dir, cfg.output.name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(to_dict(cfg), f, indent=2)
    seed_all(cfg.train.seed + rank)
    model_path = resolve_model_path(cfg.model.path)  # file-locked: one rank converts, others wait
    tok = load_tokenizer(model_path, cfg.model.chat_template)
    t1 = time.perf_counter()
    # A cache hit when launch/train.sh prepared the data before starting the ranks; otherwise one
    # rank prepares (file-locked) while the others wait, before any collective.
    prepared = ensure_prepared(cfg, tok, model_path, progress=rank == 0)
    t2 = time.perf_counter()
    found = resume_point(cfg, ckpt_dir, prepared, rank, world)
    cursor = Cursor(**found.progress["cursor"]) if found is not None else Cursor()
    # The loader's workers start now, so their start-up overlaps the engine's.
    batches = open_batches(cfg, prepared, rank, world, tok.pad_token_id, cursor)
    engine = ds.Engine(cfg, model_path, universal=found is not None and found.universal)
    if cfg.data.packing and engine.packing_leaks(len(tok)) > PACKING_TOLERANCE:
        raise ConfigError(f"{model_path}: this model does not confine attention to each dialogue of a packed "
                          "row (it ignores restarting position ids), so packed dialogues would see each other. "
                          "Set data.packing=false, or use a model class with packed-sequence support")
    print0(f"model {model_path}, {world} rank(s), ZeRO-{cfg.train.zero_stage}, {engine.dtype} "
           f"(model.dtype={cfg.model.dtype}), method {cfg.train.method}, "
           f"{'packed' if cfg.data.packing else 'padded'} rows of {cfg.data.max_length} tokens", rank=rank)
    hist = LossHistogram() if cfg.train.method == "loss_truncation" else None
    startup = {"group_model_tokenizer": t1 - t0, "data": t2 - t1, "engine": time.perf_counter() - t2}
    return Run(cfg, rank, world, run_dir, ckpt_dir, tok, engine, prepared,
               Welford(cfg.stats.num_buckets, cfg.stats.decay), hist,
               Audit(run_dir, rank, cfg.output.audit_max_rows, cfg.train.seed), found, batches, cursor,
               startup=startup)


def resume_point(cfg: Config, ckpt_dir: str, prepared: list[Prepared], rank: int, world: int) -> ckpt.Found | None:
    """The checkpoint to resume from, checked against this run's data; on another world size, its
    DeepSpeed part converted to the universal form (rank 0; the others meet it in the engine's
    first collectives, before any of them loads)."""
    found = ckpt.find(ckpt_dir, cfg.checkpoint.resume)
    if found is None:
        return None
    if found.progress["data"] != data_identity(prepared):
        raise DataError(f"{found.path} trained on data {found.progress['data']}, this run's data is "
                        f"{data_identity(prepared)}: the data position would mean nothing. Resume with the same "
                        "data.train, or start afresh with checkpoint.resume=none")
    if found.progress["world_size"] != world and cfg.train.zero_stage > 0:  # ZeRO partitions follow the world
        if rank == 0:
            ds.to_universal(found.path, found.path + ".universal")
        found.universal = True
    return found


def open_batches(cfg: Config, prepared: list[Prepared], rank: int, world: int, pad_id: int,
                 cursor: Cursor) -> Iterator[dict]:
    """This rank's batches from a global cursor on (background workers per data.num_workers)."""
    d, t = cfg.data, cfg.train
    ds_ = RankBatches([p.folder for p in prepared], [p.spec.weight for p in prepared], t.seed, d.max_length,
                      d.packing, d.pack_window, rank, world, t.micro_batch_size, pad_id, cursor)
    return make_loader(ds_, d.num_workers, d.prefetch, pin_memory=torch.cuda.is_available())


# -- one optimizer step -------------------------------------------------------
def weigh(run: Run, turns: TurnLosses) -> Weights:
    cfg, present = run.cfg, turns.count > 0
    if cfg.train.method == "resure":
        return resure_weights(turns.mean, present, run.stats, cfg.resure, run.step)
    if cfg.train.method == "loss_truncation":
        return truncation_weights(turns.mean, present, run.hist, cfg.loss_truncation)
    return sft_weights(turns.mean, present, run.stats, cfg.resure.eps)


def micro_backward(run: Run, batch: dict, global_tokens: int, acc: torch.Tensor) -> None:
    """Forward, weights, statistics merge and backward of one micro-batch (no optimizer step)."""
    logits = run.engine.forward(batch)
    dev = logits.device
    tg = shift_targets(batch["labels"].to(dev), batch["turn_ids"].to(dev), batch["doc_ids"].to(dev))
    turns = turn_losses(token_nll(logits, tg.labels), tg, len(batch["dialogue_ids"]), batch["partial"].shape[1])
    del logits
    wts = weigh(run, turns)  # statistics as they stood before this micro-step
    complete = (turns.count > 0) & ~batch["partial"].to(dev)
    depth = torch.nonzero(complete, as_tuple=True)[1]
    # All ranks merge every micro-step (non-finite losses are counted there, not merged).
    run.stats.sync_update(turns.mean[complete], depth, dev)
    if run.hist is not None:
        run.hist.sync_update(turns.mean[complete & torch.isfinite(turns.mean)], dev)
    loss_sum = weighted_loss_sum(turns, wts.w.to(dev))
    run.engine.backward(loss_sum, global_tokens)
    _account(run, batch, turns, wts, loss_sum, acc)


def _account(run: Run, batch: dict, turns: TurnLosses, wts: Weights, loss_sum: torch.Tensor,
             acc: torch.Tensor) -> None:
    """Add this micro-batch to the step's metric sums and its turns (per dialogue) to the audit."""
    dev = turns.sum.device
    w_all, present, finite = wts.w.to(dev), turns.count > 0, torch.isfinite(turns.mean)
    ok = present & finite
    w = w_all[ok]
    acc += torch.stack([
        torch.where(ok, turns.sum.detach(), torch.zeros_like(turns.sum)).sum().double(),
        loss_sum.detach().double(), ok.sum().double(), w.sum().double(), (w < 1).sum().double(),
        (w < 0.5).sum().double(), (present & ~finite).sum().double(),
        (batch["doc_ids"] >= 0).sum().double().to(dev)]).cpu()
    rows = torch.nonzero(present, as_tuple=True)
    mean, z, wv = turns.mean[rows].tolist(), wts.z.to(dev)[rows].tolist(), w_all[rows].tolist()
    warm = wts.warm.to(dev)[rows].tolist()
    part = batch["partial"][rows[0].cpu(), rows[1].cpu()].tolist()
    names, src = run.source_names, batch["sources"]
    run.audit.add([{"dialogue_id": batch["dialogue_ids"][d], "source": names[src[d]], "turn": t, "loss": m,
                    "z": None if zz != zz else zz, "weight": ww, "warm": wm, "step": run.step + 1, "partial": p}
                   for d, t, m, zz, ww, wm, p in zip(rows[0].tolist(), rows[1].tolist(), mean, z, wv, warm, part)])


def global_token_count(micro: list[dict]) -> int:
    """N: trained tokens of this optimizer step over all micro-batches and ranks (one all-reduce)."""
    local = sum(int((shift_targets(b["labels"], b["turn_ids"], b["doc_ids"]).labels != IGNORE).sum())
                for b in micro)
    return int(ds.all_reduce_sum(torch.tensor([local], dtype=torch.float64))[0])


def train_step(run: Run) -> dict:
    t0 = time.perf_counter()
    micro = [next(run.batches) for _ in range(run.cfg.train.grad_accum)]
    waited = time.perf_counter() - t0  # ~0 when the loader workers keep ahead
    n_tokens = global_token_count(micro)
    acc = torch.zeros(8, dtype=torch.float64)
    for b in micro:
        micro_backward(run, b, max(n_tokens, 1), acc)
        run.engine.step()  # DeepSpeed applies the optimizer at the accumulation boundary
    run.step += 1
    run.cursor = Cursor(**micro[-1]["cursor"])  # global: the same on every rank
    g = ds.all_reduce_sum(acc)  # step metrics over all ranks: one small all-reduce
    dt = time.perf_counter() - t0
    nturn = max(g[2].item(), 1.0)
    return {
        "step": run.step, "loss": g[0].item() / max(n_tokens, 1), "weighted_loss": g[1].item() / max(n_tokens, 1),
        "lr": run.engine.lr(), "grad_norm": run.engine.grad_norm(), "trained_tokens": n_tokens,
        "tokens_per_s": g[7].item() / dt, "step_time_s": dt, "turns": int(g[2].item()),
        "mean_weight": g[3].item() / nturn, "frac_w_lt_1": g[4].item() / nturn,
        "frac_w_lt_0.5": g[5].item() / nturn, "nonfinite_turns": int(g[6].item()),
        "bucket_n": run.stats.n.tolist(), "bucket_mean": run.stats.mean.tolist(),
        "bucket_std": run.stats.std.tolist(), "nonfinite_total": int(run.stats.nonfinite.sum().item()),
        "rows_seen": run.cursor.rows_seen, "epoch": run.cursor.epoch, "data_wait_s": waited,
    }


# -- checkpoints ----------------------------------------------------------------
def data_identity(prepared: list[Prepared]) -> list[dict]:
    """What the data cursor points into: the prepared sources, their keys and weights."""
    return [{"name": p.spec.label, "key": p.manifest.get("key", os.path.basename(p.folder)),
             "weight": p.spec.weight} for p in prepared]


def save_checkpoint(run: Run) -> None:
    run.audit.write()
    if run.cfg.checkpoint.keep_last == 0:
        return  # throwaway run (e.g. the noisy-mix study): metrics and audit only
    tag = f"step{run.step:07d}"
    run.engine.save(run.ckpt_dir, tag)
    progress = {"step": run.step, "cursor": run.cursor.to_dict(), "world_size": run.world,
                "global_batch": run.world * run.cfg.train.micro_batch_size * run.cfg.train.grad_accum,
                "data": data_identity(run.prepared),
                "welford": {**run.stats.state_dict(), "state": ckpt.tensor_to_json(run.stats.state)},
                "hist": None if run.hist is None else {**run.hist.state_dict(),
                                                       "counts": ckpt.tensor_to_json(run.hist.counts)}}
    ckpt.write_own(run.ckpt_dir, tag, run.rank, progress,
                   {"audit": run.audit.state_dict(), "rng": ckpt.rng_state()}, ds.barrier)
    if run.rank == 0:
        ckpt.rotate(run.ckpt_dir, run.cfg.checkpoint.keep_last)
    ds.barrier()


def resume(run: Run) -> None:
    found = run.resume_from
    if found is None:
        return
    p = found.progress
    t0 = time.perf_counter()
    if run.engine.load(found.ckpt_dir, found.ds_tag) is None:
        raise FileNotFoundError(f"checkpoint {found.path}: DeepSpeed found no checkpoint files there")
    run.step = p["step"]  # the cursor was read in setup, where the loader started from it
    run.stats.load_state_dict({**p["welford"], "state": torch.tensor(p["welford"]["state"], dtype=torch.float64)})
    if run.hist is not None and p.get("hist"):
        run.hist.load_state_dict({**p["hist"], "counts": torch.tensor(p["hist"]["counts"], dtype=torch.float64)})
    rng, audits = ckpt.load_rank_state(found, run.rank, run.world)
    run.audit.load_state_dicts(audits)
    if rng is not None:
        ckpt.set_rng_state(rng)
    else:  # another world size: fresh per-rank streams, still a function of seed, rank and step
        seed_all(run.cfg.train.seed + 1000003 * run.step + run.rank)
        if run.rank == 0:
            run.audit.drop_other_ranks(run.world)
    run.startup["resume"] = time.perf_counter() - t0
    print0(f"resumed from {found.path} at step {run.step} (rows seen {run.cursor.rows_seen}, epoch "
           f"{run.cursor.epoch}; saved on {p['world_size']} rank(s), now {run.world})", rank=run.rank)


# -- the loop ---------------------------------------------------------------------
def train(run: Run) -> None:
    cfg = run.cfg
    if run.rank == 0:
        run.logger = MetricsLogger(run.run_dir, cfg.train.max_steps, run.step, cfg.train.log_every,
                                   cfg.output.tensorboard)
    run.engine.train()
    print0("startup (s): " + ", ".join(f"{k} {v:.1f}" for k, v in run.startup.items()), rank=run.rank)
    every, start = cfg.checkpoint.every, run.step
    end = min(cfg.train.max_steps, cfg.train.stop_after or cfg.train.max_steps)
    while run.step < end:
        row = train_step(run)
        if run.logger is not None:
            run.logger.log(row)
        if every and run.step % every == 0 and run.step < end:
            save_checkpoint(run)
    if run.step > start:
        save_checkpoint(run)


def data_counts(prepared: list[Prepared]) -> dict:
    """Skipped records per kind and dialogues cut, over all sources (from their manifests)."""
    skipped: dict[str, int] = {}
    cut = no_token = 0
    for p in prepared:
        c = p.manifest["counts"]
        for k, v in c["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        cut, no_token = cut + c["cut_by_max_length"], no_token + c["no_trained_token"]
    return {"skipped": skipped, "cut_by_max_length": cut, "no_trained_token": no_token}


def finish(run: Run) -> None:
    """Export and the end-of-run summary and plot (rank 0)."""
    if run.cfg.checkpoint.export:
        run.engine.export_hf(os.path.join(run.run_dir, "export"), run.tokenizer)
    if run.rank == 0:
        from .report import write_report

        summary = write_report(run.run_dir, data=data_counts(run.prepared), with_plot=run.cfg.output.plot)
        print(summary, flush=True)


def run_recipe(cfg: Config) -> Run:
    """One whole run in this process; the process group stays up for the next one."""
    run = setup(cfg)
    try:
        resume(run)
        train(run)
        if run.step >= cfg.train.max_steps:
            finish(run)
        else:
            print0(f"stopped at step {run.step} of {cfg.train.max_steps} (train.stop_after); "
                   "run the same command to resume", rank=run.rank)
    finally:
        run.batches = None  # stops the loader's worker processes
        if run.logger is not None:
            run.logger.close()
    return run


def cleanup() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="[RECIPE.yaml] then dotted key=value overrides, e.g. train.max_steps=10")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    recipe, overrides = split_recipe_args(ap.parse_args(argv).args)
    try:
        run_recipe(load_config(recipe, overrides))
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"[resure_ds] error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
