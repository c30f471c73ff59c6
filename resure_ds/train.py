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
from . import dist
from .clock import Clock
from . import engine as ds
from .config import Config, load_config, parse_duration, split_recipe_args, to_dict
from .data.loader import Corpus, RankBatches, make_loader
from .data.plan import Cursor
from .data.shards import PreparedSource
from .errors import IGNORE, ConfigError, DataError
from .loss import TurnLosses, shift_targets, turn_losses, weighted_loss_sum
from . import audit as auditlog
from .audit import AuditLog
from .metrics import MetricsLogger
from .models import load_tokenizer, resolve_model_path
from .prepare import Prepared, ensure_eval_prepared, ensure_prepared
from .quantile import LossHistogram
from .stop import EXIT_RESUME, StopPolicy
from .validate import Validation
from .weighting import Weights, resure_weights, sft_weights, truncation_weights
from .welford import Welford


PACKING_TOLERANCE = 0.05  # bf16 noise is ~1e-2 of the logit scale; a leak changes logits by O(1)


print0 = dist.print0


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
    audit: AuditLog
    stop: StopPolicy
    validation: Validation | None = None
    best_val: float | None = None  # lowest validation loss so far (eval.keep_best)
    resume_from: ckpt.Found | None = None
    batches: Iterator[dict] | None = None
    cursor: Cursor = field(default_factory=Cursor)
    logger: MetricsLogger | None = None
    step: int = 0
    startup: dict = field(default_factory=dict)  # seconds spent in each phase before the first step
    clock: Clock = field(default_factory=lambda: Clock(torch.device("cpu")))  # the step's time split

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
    stop = StopPolicy(cfg.train.stop_after, parse_duration(cfg.train.time_limit))
    stop.install()  # a SIGTERM/SIGUSR1 from here on stops at a step boundary with a checkpoint
    rank, world = ds.init_distributed(cfg.dist.timeout)
    run_dir = os.path.join(cfg.output.dir, cfg.output.name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(to_dict(cfg), f, indent=2)
    seed_all(cfg.train.seed + rank)
    model_path = resolve_model_path(cfg.model.path)  # file-locked: one rank converts, others wait
    tok = load_tokenizer(model_path, cfg.model.chat_template, cfg.model.trust_remote_code)
    t1 = time.perf_counter()
    # A cache hit when launch/train.sh prepared the data before starting the ranks; otherwise one
    # rank prepares (file-locked) while the others wait, before any collective.
    prepared = ensure_prepared(cfg, tok, model_path, progress=rank == 0)
    # data.eval as a fraction: split once here (a hash of every dialogue id); the loader gets the
    # indices training may draw, validation the rows held out.
    corpus = Corpus([p.folder for p in prepared]) if holdout(cfg) else None
    keep, held = corpus.split(holdout(cfg)) if corpus is not None else (None, None)
    validation = open_validation(cfg, tok, model_path, corpus, held, rank)
    t2 = time.perf_counter()
    found = resume_point(cfg, ckpt_dir, prepared, rank, world)
    cursor = Cursor(**found.progress["cursor"]) if found is not None else Cursor()
    # The loader's workers start now, so their start-up overlaps the engine's.
    batches = open_batches(cfg, prepared, rank, world, tok.pad_token_id, cursor, keep)
    engine = ds.Engine(cfg, model_path, universal=found is not None and found.universal)
    if cfg.data.packing and engine.packing_leaks(len(tok)) > PACKING_TOLERANCE:
        raise ConfigError(f"{model_path}: this model does not confine attention to each dialogue of a packed "
                          "row (it ignores restarting position ids), so packed dialogues would see each other. "
                          "Set data.packing=false, or use a model class with packed-sequence support")
    print0(f"model {model_path}, {world} rank(s), ZeRO-{cfg.train.zero_stage}, {engine.dtype} "
           f"(model.dtype={cfg.model.dtype}), method {cfg.train.method}, "
           f"{'packed' if cfg.data.packing else 'padded'} rows of {cfg.data.max_length} tokens, "
           f"{cfg.model.attn_implementation} attention, {'fused LM head and loss' if engine.fused else 'logits path'}"
           + (f", validation on {validation.dialogues:,} dialogues" if validation else ""))
    hist = LossHistogram() if cfg.train.method == "loss_truncation" else None
    startup = {"group_model_tokenizer": t1 - t0, "data": t2 - t1, "engine": time.perf_counter() - t2}
    return Run(cfg, rank, world, run_dir, ckpt_dir, tok, engine, prepared,
               Welford(cfg.stats.num_buckets, cfg.stats.decay, cfg.stats.length_scaled, cfg.stats.scale), hist,
               AuditLog(run_dir, rank), stop, validation,
               resume_from=found, batches=batches, cursor=cursor, startup=startup, clock=Clock(engine.device))


def resume_point(cfg: Config, ckpt_dir: str, prepared: list[Prepared], rank: int, world: int) -> ckpt.Found | None:
    """The checkpoint to resume from, checked against this run's data; on another world size, its
    DeepSpeed part converted to the universal form (rank 0; the others meet it in the engine's
    first collectives, before any of them loads)."""
    found = ckpt.find(ckpt_dir, cfg.checkpoint.resume)
    if found is None:
        return None
    if found.progress["data"] != data_identity(cfg, prepared):
        raise DataError(f"{found.path} trained on data {found.progress['data']}, this run's data is "
                        f"{data_identity(cfg, prepared)}: the data position would mean nothing. Resume with the "
                        "same data.train and data.eval, or start afresh with checkpoint.resume=none")
    if found.progress["world_size"] != world and cfg.train.zero_stage > 0:  # ZeRO partitions follow the world
        if rank == 0:
            ds.to_universal(found.path, found.path + ".universal")
        found.universal = True
    return found


def holdout(cfg: Config) -> float | None:
    """data.eval as a held-out fraction of the training sources, else None."""
    return cfg.data.eval if isinstance(cfg.data.eval, float) else None


def open_validation(cfg: Config, tok, model_path: str, corpus: Corpus | None, held: np.ndarray | None,
                    rank: int) -> Validation | None:
    """The validation rows: a prepared data.eval source, or the held-out rows of the training
    corpus (in index order; every rank holds the same list and evaluates its share)."""
    if cfg.data.eval is None:
        return None
    if corpus is None:
        src = PreparedSource(ensure_eval_prepared(cfg, tok, model_path, progress=rank == 0).folder)
        rows = [src.row(i) for i in range(len(src))]
    else:
        rows = [corpus.row(int(i))[1] for i in held]
        if not rows:
            raise DataError(f"data.eval={cfg.data.eval}: no dialogue of the training data falls in the held-out "
                            "split; raise the fraction or give a validation source")
    return Validation(rows, tok.pad_token_id, cfg.eval.micro_batch_size)


def open_batches(cfg: Config, prepared: list[Prepared], rank: int, world: int, pad_id: int,
                 cursor: Cursor, keep: list[np.ndarray] | None) -> Iterator[dict]:
    """This rank's batches from a global cursor on (background workers per data.num_workers)."""
    d, t = cfg.data, cfg.train
    ds_ = RankBatches([p.folder for p in prepared], [p.spec.weight for p in prepared], t.seed, d.max_length,
                      d.packing, d.pack_window, rank, world, t.micro_batch_size, pad_id, cursor,
                      keep=keep)
    return make_loader(ds_, d.num_workers, d.prefetch, pin_memory=torch.cuda.is_available())


# -- one optimizer step -------------------------------------------------------
def weigh(run: Run, turns: TurnLosses) -> Weights:
    cfg, present = run.cfg, turns.count > 0
    if cfg.train.method == "resure":
        return resure_weights(turns.mean, present, run.stats, cfg.resure, run.step, turns.count)
    if cfg.train.method == "loss_truncation":
        return truncation_weights(turns.mean, present, run.hist, cfg.loss_truncation)
    return sft_weights(turns.mean, present, run.stats, cfg.resure.eps, turns.count)


def micro_backward(run: Run, batch: dict, global_tokens: int, acc: dict) -> tuple[TurnLosses, Weights]:
    """Forward, weights, statistics merge and backward of one micro-batch (no optimizer step).
    Returns its turn losses and weights for the audit, which the step writes after the optimizer
    (reading them to the host here would stall a GPU before its backward)."""
    clock, dev = run.clock, run.engine.device
    tg = shift_targets(batch["labels"].to(dev), batch["turn_ids"].to(dev), batch["doc_ids"].to(dev))
    nll = run.engine.token_nll(batch, tg.labels)
    clock.mark("forward")
    _fault_point("step", run.step + 1, run.rank)
    turns = turn_losses(nll, tg, len(batch["dialogue_ids"]), batch["partial"].shape[1])
    wts = weigh(run, turns)  # statistics as they stood before this micro-step
    loss_sum = weighted_loss_sum(turns, wts.w.to(dev))
    clock.mark("resure")
    complete = (turns.count > 0) & ~batch["partial"].to(dev)
    depth = torch.nonzero(complete, as_tuple=True)[1]
    # All ranks merge every micro-step (non-finite losses are counted there, not merged).
    run.stats.sync_update(turns.mean[complete], depth, dev, turns.count[complete])
    if run.hist is not None:
        run.hist.sync_update(turns.mean[complete & torch.isfinite(turns.mean)], dev)
    clock.mark("collectives")
    run.engine.backward(loss_sum, global_tokens)
    clock.mark("backward")
    _accumulate(batch, turns, wts, loss_sum, acc)
    clock.mark("bookkeeping")
    return turns, wts


def _accumulate(batch: dict, turns: TurnLosses, wts: Weights, loss_sum: torch.Tensor, acc: dict) -> None:
    """Add this micro-batch to the step's metric sums (by name, on the device: no sync here)."""
    dev = turns.sum.device
    w_all, present, finite = wts.w.to(dev), turns.count > 0, torch.isfinite(turns.mean)
    ok = present & finite
    w = w_all[ok]
    for k, v in {"nll": torch.where(ok, turns.sum.detach(), torch.zeros_like(turns.sum)).sum(),
                 "weighted_nll": loss_sum.detach(), "turns": ok.sum(), "weight_sum": w.sum(),
                 "w_lt_1": (w < 1).sum(), "w_lt_half": (w < 0.5).sum(), "nonfinite": (present & ~finite).sum(),
                 "real_tokens": (batch["doc_ids"] >= 0).sum()}.items():
        acc[k] = acc.get(k, 0.0) + v.double().to(dev)


def _audit(run: Run, step: int, batch: dict, turns: TurnLosses, wts: Weights) -> None:
    """This micro-batch's turns (per dialogue), trained in optimizer step `step`, into the audit:
    reads them to the host."""
    dev = turns.sum.device
    w_all, present = wts.w.to(dev), turns.count > 0
    rows = torch.nonzero(present, as_tuple=True)
    mean, z, wv = turns.mean[rows].tolist(), wts.z.to(dev)[rows].tolist(), w_all[rows].tolist()
    warm = wts.warm.to(dev)[rows].tolist()
    part = batch["partial"][rows[0].cpu(), rows[1].cpu()].tolist()
    names, src = run.source_names, batch["sources"]
    run.audit.add([{"dialogue_id": batch["dialogue_ids"][d], "source": names[src[d]], "turn": t, "loss": m,
                    "z": None if zz != zz else zz, "weight": ww, "warm": wm, "step": step, "partial": p}
                   for d, t, m, zz, ww, wm, p in zip(rows[0].tolist(), rows[1].tolist(), mean, z, wv, warm, part)])


def global_token_count(micro: list[dict]) -> int:
    """N: trained tokens of this optimizer step over all micro-batches and ranks (one all-reduce)."""
    local = sum(int((shift_targets(b["labels"], b["turn_ids"], b["doc_ids"]).labels != IGNORE).sum())
                for b in micro)
    return int(dist.all_reduce_sum(torch.tensor([local], dtype=torch.float64), ds.device())[0])


def train_step(run: Run) -> dict:
    t0, clock = time.perf_counter(), run.clock
    clock.start()
    micro = [next(run.batches) for _ in range(run.cfg.train.grad_accum)]
    waited = time.perf_counter() - t0  # ~0 when the loader workers keep ahead
    clock.mark("data")
    n_tokens = global_token_count(micro)
    clock.mark("collectives")
    acc: dict = {}
    audit = []
    for b in micro:
        audit.append((b, *micro_backward(run, b, max(n_tokens, 1), acc)))
        run.engine.step()  # DeepSpeed applies the optimizer at the accumulation boundary
        clock.mark("optimizer")
    run.step += 1
    run.cursor = Cursor(**micro[-1]["cursor"])  # global: the same on every rank
    # Step metrics over all ranks, and whether any rank must stop: one small all-reduce.
    g = dist.all_reduce_dict({**acc, **run.stop.local_request()}, device=ds.device())
    clock.mark("collectives")
    for b, turns, wts in audit:
        _audit(run, run.step, b, turns, wts)
    clock.mark("bookkeeping")
    dt = time.perf_counter() - t0
    nturn = max(g["turns"], 1.0)
    return {
        "step": run.step, "loss": g["nll"] / max(n_tokens, 1), "weighted_loss": g["weighted_nll"] / max(n_tokens, 1),
        "lr": run.engine.lr(), "grad_norm": run.engine.grad_norm(), "trained_tokens": n_tokens,
        "tokens_per_s": g["real_tokens"] / dt, "step_time_s": dt, "turns": int(g["turns"]),
        "mean_weight": g["weight_sum"] / nturn, "frac_w_lt_1": g["w_lt_1"] / nturn,
        "frac_w_lt_0.5": g["w_lt_half"] / nturn, "nonfinite_turns": int(g["nonfinite"]),
        "stop_signal": g["stop_signal"] > 0, "stop_time": g["stop_time"] > 0,
        "bucket_n": run.stats.n.tolist(), "bucket_mean": run.stats.mean.tolist(),
        "bucket_std": run.stats.std.tolist(), "nonfinite_total": int(run.stats.nonfinite.sum().item()),
        "rows_seen": run.cursor.rows_seen, "epoch": run.cursor.epoch, "data_wait_s": waited,
        **({} if run.stats.robust is None else {"bucket_median": run.stats.center.tolist(),
                                                "bucket_scale": run.stats.spread.tolist()}),
        **clock.split(),
    }


# -- checkpoints ----------------------------------------------------------------
def data_identity(cfg: Config, prepared: list[Prepared]) -> list[dict]:
    """What the data cursor points into: the prepared sources, their keys and weights, and the
    held-out validation fraction (it changes which dialogues are drawn)."""
    frac = holdout(cfg)
    return [{"name": p.spec.label, "key": p.manifest.get("key", os.path.basename(p.folder)),
             "weight": p.spec.weight, **({"holdout": frac} if frac else {})} for p in prepared]


def save_checkpoint(run: Run) -> None:
    """Every rank writes into <tag>.saving; rank 0 verifies and publishes, then rotates (checkpoint.py)."""
    t0 = time.perf_counter()
    run.audit.flush()
    if run.cfg.checkpoint.keep_last == 0:
        return  # throwaway run (e.g. the noisy-mix study): metrics and audit only
    tag = f"step{run.step:07d}"
    if run.rank == 0:
        ckpt.clear_staging(run.ckpt_dir)
    dist.barrier()
    run.engine.save(run.ckpt_dir, ckpt.staging(tag))
    ckpt.write_rank_state(run.ckpt_dir, ckpt.staging(tag), run.rank,
                          {"rng": ckpt.rng_state()})
    _fault_point("save", run.step, run.rank)
    dist.barrier()
    if run.rank == 0:
        ckpt.publish(run.ckpt_dir, tag, progress_record(run), run.world)
        ckpt.rotate(run.ckpt_dir, run.cfg.checkpoint.keep_last)
    dist.barrier()
    run.stop.slowest_save = max(run.stop.slowest_save, time.perf_counter() - t0)


def progress_record(run: Run) -> dict:
    """What a resume restores besides DeepSpeed's state: the same on every rank."""
    return {"step": run.step, "cursor": run.cursor.to_dict(), "world_size": run.world,
            "global_batch": run.world * run.cfg.train.micro_batch_size * run.cfg.train.grad_accum,
            "data": data_identity(run.cfg, run.prepared), "best_val": run.best_val,
            "welford": {**run.stats.state_dict(), "state": ckpt.tensor_to_json(run.stats.state)},
            "hist": None if run.hist is None else {**run.hist.state_dict(),
                                                   "counts": ckpt.tensor_to_json(run.hist.counts)}}


def _fault_point(where: str, step: int, rank: int) -> None:
    """Fault injection for the reliability tests (tests/test_faults.py): RESURE_FAULT=WHERE:STEP:RANK
    kills that rank with SIGKILL at that point. step: in the middle of optimizer step STEP (after
    its first forward); save: inside the save of step STEP (DeepSpeed's files written, not published)."""
    spec = os.environ.get("RESURE_FAULT", "")
    if spec and spec.split(":") == [where, str(step), str(rank)]:
        import signal

        print(f"[resure_ds] RESURE_FAULT: killing rank {rank} during the {where} of step {step}",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def resume(run: Run) -> None:
    """Restore the state of the checkpoint found in setup; without one, a fresh start (which drops
    an earlier run's audit rows from a reused run folder)."""
    found = run.resume_from
    if found is None:
        _truncate_audit(run, 0)
        return
    p = found.progress
    t0 = time.perf_counter()
    if run.engine.load(found.ckpt_dir, found.ds_tag) is None:
        raise FileNotFoundError(f"checkpoint {found.path}: DeepSpeed found no checkpoint files there")
    run.step = p["step"]  # the cursor was read in setup, where the loader started from it
    run.best_val = p.get("best_val")
    run.stats.load_state_dict({**p["welford"], "state": torch.tensor(p["welford"]["state"], dtype=torch.float64)})
    if run.hist is not None and p.get("hist"):
        run.hist.load_state_dict({**p["hist"], "counts": torch.tensor(p["hist"]["counts"], dtype=torch.float64)})
    rng = ckpt.load_rank_rng(found, run.rank, run.world)
    if rng is not None:
        ckpt.set_rng_state(rng)
    else:  # another world size: fresh per-rank streams, still a function of seed, rank and step
        seed_all(run.cfg.train.seed + 1000003 * run.step + run.rank)
    _truncate_audit(run, run.step)
    run.startup["resume"] = time.perf_counter() - t0
    print0(f"resumed from {found.path} at step {run.step} (rows seen {run.cursor.rows_seen}, epoch "
           f"{run.cursor.epoch}; saved on {p['world_size']} rank(s), now {run.world})")


# -- the loop ---------------------------------------------------------------------
def train(run: Run) -> str | None:
    """Steps until max_steps, or until a stop (returns its reason: the run is resumable)."""
    cfg = run.cfg
    if run.rank == 0:
        from .config import to_dict
        from .trackers import open_trackers

        trackers = open_trackers(cfg.output.report_to, run.run_dir, run.step, to_dict(cfg), cfg.output.project,
                                 cfg.output.name)
        run.logger = MetricsLogger(run.run_dir, cfg.train.max_steps, run.step, cfg.train.log_every, trackers)
    run.engine.train()
    print0("startup (s): " + ", ".join(f"{k} {v:.1f}" for k, v in run.startup.items()))
    every, start = cfg.checkpoint.every, run.step
    end = run.stop.end_step(start, cfg.train.max_steps)
    reason = None
    while run.step < end and reason is None:
        row = train_step(run)
        run.stop.slowest_step = max(run.stop.slowest_step, row["step_time_s"])
        if run.validation is not None and (run.step == cfg.train.max_steps
                                           or (cfg.eval.every and run.step % cfg.eval.every == 0)):
            row.update(validate(run))
        signalled, out_of_time = row.pop("stop_signal"), row.pop("stop_time")
        if run.logger is not None:
            run.logger.log(row)
        if run.step < cfg.train.max_steps:
            reason = ("a signal (SIGTERM/SIGUSR1)" if signalled else "train.time_limit" if out_of_time
                      else "train.stop_after" if run.step >= end else None)
        if every and run.step % every == 0 and run.step < end and reason is None:
            save_checkpoint(run)
    if run.step > start:
        save_checkpoint(run)
    return reason


def validate(run: Run) -> dict:
    """Validation metrics for this step (every rank); a new best is exported when eval.keep_best."""
    t0 = time.perf_counter()
    res = run.validation.run(run.engine)
    res["val_time_s"] = time.perf_counter() - t0
    if run.cfg.eval.keep_best and (run.best_val is None or res["val_loss"] < run.best_val):
        run.best_val = res["val_loss"]  # identical on every rank (all-reduced), so all export together
        run.engine.export_hf(os.path.join(run.run_dir, "best"), run.tokenizer)
        if run.rank == 0:
            with open(os.path.join(run.run_dir, "best", "resure_best.json"), "w", encoding="utf-8") as f:
                json.dump({"step": run.step, "val_loss": res["val_loss"]}, f)
    return res


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


def _truncate_audit(run: Run, step: int) -> None:
    """The audit rows of steps after `step` belong to training that is being redone (rank 0 edits,
    the others wait: nobody writes before the barrier)."""
    if run.rank == 0:
        dropped = auditlog.truncate(run.run_dir, step)
        if dropped:
            print0(f"audit: dropped {dropped:,} rows of steps after {step} (training redone from there)")
    dist.barrier()


def finish(run: Run) -> None:
    """Export and the end-of-run summary and plot (rank 0)."""
    if run.cfg.checkpoint.export:
        run.engine.export_hf(os.path.join(run.run_dir, "export"), run.tokenizer)
    if run.rank == 0:
        from .report import write_report

        out = run.cfg.output
        summary = write_report(run.run_dir, data=data_counts(run.prepared), with_plot=out.plot, html=out.report,
                               top=out.report_top)
        print(summary, flush=True)


def run_recipe(cfg: Config) -> Run:
    """One whole run (or, after a stop, one leg of it) in this process; the process group stays up."""
    run = setup(cfg)
    try:
        resume(run)
        reason = train(run)
        if run.step >= cfg.train.max_steps:
            finish(run)
        else:
            print0(f"stopped at step {run.step} of {cfg.train.max_steps} ({reason}); checkpoint saved, exit "
                   f"status {EXIT_RESUME}: run the same command to continue")
    finally:
        run.batches = None  # stops the loader's worker processes
        if run.logger is not None:
            run.logger.close()
    return run


def cleanup() -> None:
    dist.destroy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="[RECIPE.yaml] then dotted key=value overrides, e.g. train.max_steps=10")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    recipe, overrides = split_recipe_args(ap.parse_args(argv).args)
    try:
        cfg = load_config(recipe, overrides)
        run = run_recipe(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"[resure_ds] error{_on_rank()}: {e}", file=sys.stderr, flush=True)
        return _fail(2)
    except BaseException:
        import traceback

        traceback.print_exc()
        print(f"[resure_ds] error{_on_rank()}: the run failed (traceback above); the other ranks stop too",
              file=sys.stderr, flush=True)
        return _fail(1)
    cleanup()
    return 0 if run.step >= cfg.train.max_steps else EXIT_RESUME


def _on_rank() -> str:
    return f" on rank {dist.rank()}" if dist.world() > 1 else ""


def _fail(code: int) -> int:
    """Leave at once: the other ranks may be waiting in a collective that will never complete, so
    no goodbye collective (destroy_process_group) and no waiting on loader workers. The launcher
    sees the status and ends the other ranks; without one, they hit dist.timeout."""
    if dist.world() == 1:
        cleanup()
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
