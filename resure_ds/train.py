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
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from . import engine as ds
from .config import Config, ConfigError, load_config, split_recipe_args, to_dict
from .data.collate import collate
from .data.records import DataError
from .data.render import Renderer
from .data.stream import ExampleStream, batches
from .loss import IGNORE, TurnLosses, shift_targets, token_nll, turn_losses, weighted_loss_sum
from .metrics import Audit, MetricsLogger
from .models import load_tokenizer, resolve_model_path
from .quantile import LossHistogram
from .weighting import Weights, resure_weights, sft_weights, truncation_weights
from .welford import Welford


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
    stream: ExampleStream
    batch_iter: Iterator
    stats: Welford
    hist: LossHistogram | None
    audit: Audit
    logger: MetricsLogger | None = None
    step: int = 0


# -- setup ------------------------------------------------------------------
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def setup(cfg: Config) -> Run:
    rank, world = ds.init_distributed()
    run_dir = os.path.join(cfg.output.dir, cfg.output.name)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(to_dict(cfg), f, indent=2)
    seed_all(cfg.train.seed + rank)
    model_path = resolve_model_path(cfg.model.path)  # file-locked: one rank converts, others wait
    tok = load_tokenizer(model_path, cfg.model.chat_template)
    stream = ExampleStream(cfg.data.train, Renderer(tok, cfg.data.max_length), rank, world,
                           cfg.train.seed, cfg.data.shuffle_buffer, cfg.data.skip_invalid)
    pad = tok.pad_token_id
    batch_iter = (collate(b, pad) for b in batches(stream, cfg.train.micro_batch_size))
    engine = ds.Engine(cfg, model_path)
    print0(f"model {model_path}, {world} rank(s), ZeRO-{cfg.train.zero_stage}, {engine.dtype} "
           f"(model.dtype={cfg.model.dtype}), method {cfg.train.method}", rank=rank)
    hist = LossHistogram() if cfg.train.method == "loss_truncation" else None
    return Run(cfg, rank, world, run_dir, os.path.join(run_dir, "checkpoints"), tok, engine, stream,
               batch_iter, Welford(cfg.stats.num_buckets, cfg.stats.decay), hist,
               Audit(run_dir, rank, cfg.output.audit_max_rows, cfg.train.seed))


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
    targets, turn_t = shift_targets(batch["labels"].to(dev), batch["turn_ids"].to(dev))
    turns = turn_losses(token_nll(logits, targets), turn_t, batch["partial"].shape[1])
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
    """Add this micro-batch to the step's metric sums and its turns to the audit."""
    dev = turns.sum.device
    w_all, present, finite = wts.w.to(dev), turns.count > 0, torch.isfinite(turns.mean)
    ok = present & finite
    w = w_all[ok]
    acc += torch.stack([
        torch.where(ok, turns.sum.detach(), torch.zeros_like(turns.sum)).sum().double(),
        loss_sum.detach().double(), ok.sum().double(), w.sum().double(), (w < 1).sum().double(),
        (w < 0.5).sum().double(), (present & ~finite).sum().double(),
        batch["attention_mask"].sum().double().to(dev)]).cpu()
    rows = torch.nonzero(present, as_tuple=True)
    mean, z, wv = turns.mean[rows].tolist(), wts.z.to(dev)[rows].tolist(), w_all[rows].tolist()
    warm = wts.warm.to(dev)[rows].tolist()
    part = batch["partial"][rows[0].cpu(), rows[1].cpu()].tolist()
    run.audit.add([{"dialogue_id": batch["dialogue_ids"][b], "turn": t, "loss": m, "z": None if zz != zz else zz,
                    "weight": ww, "warm": wm, "step": run.step + 1, "partial": p}
                   for b, t, m, zz, ww, wm, p in zip(rows[0].tolist(), rows[1].tolist(), mean, z, wv, warm, part)])


def global_token_count(micro: list[dict]) -> int:
    """N: trained tokens of this optimizer step over all micro-batches and ranks (one all-reduce)."""
    local = sum(int((shift_targets(b["labels"], b["turn_ids"])[0] != IGNORE).sum()) for b in micro)
    return int(ds.all_reduce_sum(torch.tensor([local], dtype=torch.float64))[0])


def train_step(run: Run) -> dict:
    t0 = time.perf_counter()
    micro = [next(run.batch_iter) for _ in range(run.cfg.train.grad_accum)]
    n_tokens = global_token_count(micro)
    acc = torch.zeros(8, dtype=torch.float64)
    for b in micro:
        micro_backward(run, b, max(n_tokens, 1), acc)
        run.engine.step()  # DeepSpeed applies the optimizer at the accumulation boundary
    run.step += 1
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
    }


# -- checkpoints ----------------------------------------------------------------
def _rank_state_path(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"rank_state_{rank:05d}.pt")


def save_checkpoint(run: Run) -> None:
    run.audit.write()
    if run.cfg.checkpoint.keep_last == 0:
        return  # throwaway run (e.g. the noisy-mix study): metrics and audit only
    tag = f"step{run.step:07d}"
    client = {"step": run.step, "welford": run.stats.state_dict(),
              "hist": run.hist.state_dict() if run.hist is not None else None}
    run.engine.save(run.ckpt_dir, tag, client)
    torch.save({"stream": run.stream.state_dict(), "audit": run.audit.state_dict(),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state()}},
               _rank_state_path(run.ckpt_dir, tag, run.rank))
    ds.barrier()
    if run.rank == 0:
        tags = sorted(t for t in os.listdir(run.ckpt_dir) if t.startswith("step"))
        for old in tags[:-run.cfg.checkpoint.keep_last]:
            shutil.rmtree(os.path.join(run.ckpt_dir, old), ignore_errors=True)
    ds.barrier()


def resume(run: Run) -> None:
    spec = run.cfg.checkpoint.resume
    if spec == "none":
        return
    if spec == "auto":
        latest = os.path.join(run.ckpt_dir, "latest")  # written by DeepSpeed after each save
        if not os.path.exists(latest):
            return
        with open(latest, encoding="utf-8") as f:
            ckpt_dir, tag = run.ckpt_dir, f.read().strip()
    else:
        ckpt_dir, tag = os.path.dirname(spec.rstrip("/")), os.path.basename(spec.rstrip("/"))
    path, client = run.engine.load(ckpt_dir, tag)
    if path is None:
        raise FileNotFoundError(f"checkpoint.resume={spec}: no checkpoint {tag} in {ckpt_dir}")
    run.step = client["step"]
    run.stats.load_state_dict(client["welford"])
    if run.hist is not None and client.get("hist"):
        run.hist.load_state_dict(client["hist"])
    st = torch.load(_rank_state_path(ckpt_dir, tag, run.rank), weights_only=False)
    run.stream.load_state_dict(st["stream"])
    run.audit.load_state_dict(st["audit"])
    random.setstate(st["rng"]["python"])
    np.random.set_state(st["rng"]["numpy"])
    torch.set_rng_state(st["rng"]["torch"])
    print0(f"resumed from {os.path.join(ckpt_dir, tag)} at step {run.step}", rank=run.rank)


# -- the loop ---------------------------------------------------------------------
def train(run: Run) -> None:
    cfg = run.cfg
    if run.rank == 0:
        run.logger = MetricsLogger(run.run_dir, cfg.train.max_steps, run.step, cfg.train.log_every,
                                   cfg.output.tensorboard)
    run.engine.train()
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


def finish(run: Run) -> None:
    """Export and the end-of-run summary and plot (rank 0)."""
    if run.cfg.checkpoint.export:
        run.engine.export_hf(os.path.join(run.run_dir, "export"), run.tokenizer)
    if run.rank == 0:
        from .report import write_report

        summary = write_report(run.run_dir, skipped=dict(run.stream.skip_counts),
                               cut_by_max_length=run.stream.truncated_away, with_plot=run.cfg.output.plot)
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
