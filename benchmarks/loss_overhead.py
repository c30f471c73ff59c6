"""Cost of ReSURE's per-turn loss + weights vs plain token-mean cross-entropy, on given logits.

This is the logits path (model.fused_loss=false); benchmarks/loss_memory.py
measures the fused head and loss, which never makes the logits.

The baseline is the loss a Hugging Face causal LM computes itself
(transformers' ForCausalLMLoss: upcast the logits to fp32, shift, token-mean
cross-entropy). Same logits for both (B=8 x S=1024 tokens, V=49,152, turns
of 20-60 tokens, about half the tokens trained), measured side by side,
interleaved, median of --repeats. Prints ratios; target <= 1.10.

    python benchmarks/loss_overhead.py [--dtype fp32|bf16] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from resure_ds.config import ResureConfig
from resure_ds.data import IGNORE
from resure_ds.stats.turns import shift_targets, turn_losses, weighted_loss_sum
from resure_ds.runtime.nll import token_nll
from resure_ds.stats.weighting import resure_weights
from resure_ds.stats.welford import Welford, summarize


def make_batch(B, S, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=g).to(dtype)
    ids = torch.randint(0, V, (B, S), generator=g)
    turn_ids = torch.full((B, S), -1)
    for b in range(B):
        pos, t = 0, 0
        while pos < S:
            user = int(torch.randint(20, 60, (1,), generator=g))
            reply = int(torch.randint(20, 60, (1,), generator=g))
            turn_ids[b, pos + user: pos + user + reply] = t
            pos, t = pos + user + reply, t + 1
    labels = torch.where(turn_ids >= 0, ids, IGNORE)
    return logits, labels, turn_ids


def plain(logits, labels, turn_ids, backward):
    loss = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])
    if backward:
        loss.backward()
    return loss


def resure(logits, labels, turn_ids, backward, stats, cfg):
    tg = shift_targets(labels, turn_ids)
    T = int(turn_ids.max()) + 1
    turns = turn_losses(token_nll(logits, tg.labels), tg, logits.shape[0], T)
    present = turns.count > 0
    w = resure_weights(turns.mean, present, stats, cfg, step=10 ** 6).w
    complete = present & torch.isfinite(turns.mean)
    summarize(turns.mean[complete], stats.bucket(torch.nonzero(complete)[:, 1]), stats.num_buckets)
    loss = weighted_loss_sum(turns, w) / (tg.labels != IGNORE).sum()
    if backward:
        loss.backward()
    return loss


def timed(fn, *args):
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--S", type=int, default=1024)
    ap.add_argument("--V", type=int, default=49152)
    a = ap.parse_args()
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    logits, labels, turn_ids = make_batch(a.B, a.S, a.V, dtype)
    stats = Welford(8)
    stats.sync_update(torch.rand(4096, dtype=torch.float64) * 3 + 1, torch.randint(0, 12, (4096,)))
    cfg = ResureConfig()
    print(f"logits {a.B}x{a.S}x{a.V} {a.dtype}, threads={torch.get_num_threads()}, repeats={a.repeats}")
    for backward in (False, True):
        x = logits.clone().requires_grad_(backward)
        base, ours = [], []
        for _ in range(a.repeats + 1):  # first round is warm-up
            x.grad = None
            base.append(timed(plain, x, labels, turn_ids, backward))
            x.grad = None
            ours.append(timed(resure, x, labels, turn_ids, backward, stats, cfg))
        b, o = statistics.median(base[1:]), statistics.median(ours[1:])
        name = "forward+backward" if backward else "forward"
        print(f"{name:17s} HF causal-LM loss {b * 1e3:8.1f} ms   per-turn+weights {o * 1e3:8.1f} ms   "
              f"ratio {o / b:.3f}")


if __name__ == "__main__":
    main()
