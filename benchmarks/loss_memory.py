"""Peak memory and time of the LM head + per-token loss, fused (resure_ds/runtime/fused.py) vs the logits path.

The logits path is what the recipe did before the fused head, and what it
still does with model.fused_loss=false: the model's Linear head makes
[B, S, V] logits, resure_ds.runtime.nll.token_nll turns them into per-token NLL a
chunk at a time, and backward holds the logits' gradient. Same hidden
states, head weight, targets and per-token weights for both; forward and
backward of sum(w * nll). SmolLM2-135M's shape by default (H 576, V 49,152),
8 x 2048 tokens, a third of them trained (as in chitchat).

Each variant runs in a fresh process; peak memory is the growth of the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
over the inputs already in memory. Prints both and the ratios.

    python benchmarks/loss_memory.py [--batch 8] [--seq 2048] [--repeats 3] [--trained 0.33]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")


def worker(variant: str, a) -> dict:
    import torch
    import torch.nn.functional as F

    from resure_ds.data import IGNORE
    from resure_ds.runtime.fused import linear_nll
    from resure_ds.runtime.nll import token_nll

    torch.manual_seed(0)
    hidden = torch.randn(a.batch, a.seq, a.hidden).requires_grad_()
    weight = (torch.randn(a.vocab, a.hidden) * 0.02).requires_grad_()
    targets = torch.randint(0, a.vocab, (a.batch, a.seq))
    targets[torch.rand(a.batch, a.seq) > a.trained] = IGNORE
    w = torch.rand(a.batch, a.seq)

    def step():
        if variant == "fused":
            nll = linear_nll(hidden, weight, None, targets)
        else:
            nll = token_nll(F.linear(hidden, weight), targets)
        (w * nll).sum().backward()
        hidden.grad = weight.grad = None
        return nll

    step()  # warm-up: allocator, kernels
    times, peaks = [], []
    for _ in range(a.repeats):
        base = peak_rss()
        reset_peak()
        base = min(base, peak_rss())
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        peaks.append(peak_rss() - base)
    return {"variant": variant, "time_s": statistics.median(times), "peak_bytes": max(peaks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--trained", type=float, default=0.33, help="fraction of positions with a target")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "loss_memory.json"))
    ap.add_argument("--worker", choices=["fused", "logits"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return
    args = [f"--{k}={getattr(a, k)}" for k in ("batch", "seq", "hidden", "vocab", "trained", "repeats")]
    res = {}
    for v in ("logits", "fused"):
        out = subprocess.run([sys.executable, __file__, f"--worker={v}", *args], cwd=ROOT, capture_output=True,
                             text=True, check=True, env={**os.environ, "PYTHONPATH": ROOT})
        res[v] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"LM head + loss, forward and backward, {a.batch} x {a.seq} tokens, H {a.hidden}, V {a.vocab}, "
          f"{a.trained:.0%} trained; median of {a.repeats}")
    for v, r in res.items():
        print(f"  {v:7s} peak +{r['peak_bytes'] / 2 ** 20:8.0f} MiB   {r['time_s']:6.2f} s")
    lo, fu = res["logits"], res["fused"]
    print(f"  fused / logits: memory {fu['peak_bytes'] / lo['peak_bytes']:.3f}x, time {fu['time_s'] / lo['time_s']:.2f}x")
    path = a.results
    os.makedirs(os.path.dirname(path), exist_ok=True)
    saved = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    saved[f"{a.batch}x{a.seq}, trained {a.trained}"] = {"args": vars(a), "results": res}  # one entry per setting
    with open(path, "w", encoding="utf-8") as f:
        json.dump(saved, f, indent=1)


if __name__ == "__main__":
    main()
