"""Per-micro-step cost of two signals and per-source statistics on real ranks: the method's weights and
its statistics merge (stats/method.py: weigh, merge, and after each optimizer step the mixture's move),
for the paper's one signal on one source beside both signals at 8, 64 and 512 sources, fixed and
adaptive. Side by side, interleaved, median of --repeats after a warm-up; gloo on CPU, NCCL with
--device cuda (one GPU per rank). Prints milliseconds, the ratio to the one-signal step, and the bytes
each rank hands to the collectives per micro-step (counted at resure_ds.dist).

    python benchmarks/signals_cost.py [--ranks 2] [--turns 64] [--repeats 30] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resure_ds.config import load_config  # noqa: E402
from resure_ds import dist  # noqa: E402
from resure_ds.stats.method import Method  # noqa: E402
from resure_ds.stats.turns import TurnLosses  # noqa: E402

QUANTILE = ["resure.threshold=quantile", "resure.weight_fn=hard", "resure.down_share=0.2", "resure.min_count=4"]
ROWS = [  # (label, sources, overrides)
    ("[loss], 1 source (the paper's rule)", 1, ["resure.min_count=4"]),
    ("[loss], 1 source, quantile", 1, QUANTILE),
    *[(f"[loss, excess], {s} sources, quantile, {m}", s,
       [*QUANTILE, "stats.signals=[loss,excess]", "resure.two_sided=[excess]", f"data.mixture={m}"])
      for s in (8, 64, 512) for m in ("fixed", "adaptive")],
]
SENT = {"bytes": 0}


def _counting(fn):
    def wrapped(t, *args, **kw):
        SENT["bytes"] += t.numel() * t.element_size()
        return fn(t, *args, **kw)
    return wrapped


def one_step(m: Method, seen: dict, count: torch.Tensor, sources: torch.Tensor, device: str) -> tuple[float, int]:
    """What step.py does per micro-step: weights from the statistics as they stand, then the merge,
    then (once per optimizer step; here every micro-step, the upper end) the mixture's move."""
    tdist.barrier()
    SENT["bytes"] = 0
    t = time.perf_counter()
    w = m.weigh(seen, 10 ** 6, count, sources)
    m.merge(seen, count > 0, device, sources, w)
    m.end_step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, SENT["bytes"]


def worker(rank: int, world: int, port: int, a: argparse.Namespace, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if a.device == "cuda":
        torch.cuda.set_device(rank)
    tdist.init_process_group("nccl" if a.device == "cuda" else "gloo", rank=rank, world_size=world)
    dist.all_gather_cat = _counting(dist.all_gather_cat)
    dist.all_reduce_sum = _counting(dist.all_reduce_sum)
    g = torch.Generator().manual_seed(rank)
    D = a.turns // 8
    loss = (torch.rand(D, 8, generator=g, dtype=torch.float64) * 4 + 1).to(a.device)
    ref = (loss - torch.rand(D, 8, generator=g, dtype=torch.float64)).to(a.device)
    count = torch.full((D, 8), 12, device=a.device)
    turns = TurnLosses(loss.clone(), count, loss)
    methods, inputs = {}, {}
    for label, s, over in ROWS:
        m = Method(load_config(None, over), [1.0 + (i % 3) for i in range(s)])
        methods[label] = m
        inputs[label] = (m.statistic(turns, ref), torch.randint(0, s, (D,), generator=g).to(a.device))
    times, sent = {k: [] for k in methods}, {}
    for _ in range(a.repeats + 5):  # the first 5 rounds are warm-up
        for k, m in methods.items():
            dt, b = one_step(m, *inputs[k][:1], count, inputs[k][1], a.device)
            times[k].append(dt)
            sent[k] = b
    if rank == 0:
        out.update({k: (statistics.median(v[5:]), sent[k]) for k, v in times.items()})
    tdist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--turns", type=int, default=64, help="turns per rank and micro-step (a multiple of 8)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = ap.parse_args()
    if a.repeats < 1 or a.turns < 8 or a.turns % 8:
        ap.error("--repeats >= 1 and --turns a positive multiple of 8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as mgr:
        out = mgr.dict()
        mp.spawn(worker, args=(a.ranks, port, a, out), nprocs=a.ranks)
        res = dict(out)
    base = res[ROWS[0][0]][0]
    print(f"{a.ranks} ranks ({a.device}), {a.turns} turns per rank and micro-step, median of {a.repeats}")
    print("| signals, sources, rule, mixture | ms per micro-step | x the paper's rule | bytes to collectives per rank |")
    print("| --- | --- | --- | --- |")
    for label, _, _ in ROWS:
        t, b = res[label]
        print(f"| {label} | {t * 1e3:.2f} | {t / base:.2f} | {b:,} |")


if __name__ == "__main__":
    main()
