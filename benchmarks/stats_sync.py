"""Per-micro-step cost of the statistics on real ranks: the paper's Welford merge (stats.scale=std)
against Welford plus the per-bucket loss histograms (stats.scale=mad), each with the z and weights
of one micro-batch's turns. Side by side, interleaved, median of --repeats after a warm-up; gloo on
CPU, NCCL with --device cuda (one GPU per rank). Prints milliseconds and the ratio mad / std.

    python benchmarks/stats_sync.py [--ranks 2] [--turns 64] [--repeats 50] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resure_ds.config import ResureConfig  # noqa: E402
from resure_ds.stats.weighting import resure_weights  # noqa: E402
from resure_ds.stats.welford import Welford  # noqa: E402


def one_step(w: Welford, loss: torch.Tensor, turns: torch.Tensor, cfg: ResureConfig, device: str) -> float:
    """Weights from the statistics as they stand, then this micro-step's merge: what train.py does."""
    dist.barrier()
    t = time.perf_counter()
    grid = loss.view(-1, 8)  # [dialogues, turns]
    resure_weights(grid, torch.ones_like(grid, dtype=torch.bool), w, cfg, step=10 ** 6)
    w.sync_update(loss, turns, device)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def worker(rank: int, world: int, port: int, a: argparse.Namespace, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if a.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    loss = (torch.rand(a.turns, generator=g, dtype=torch.float64) * 4 + 1).to(a.device)
    turns = (torch.arange(a.turns) % 8).to(a.device)
    cfg = ResureConfig(min_count=4)
    runs = {"std": Welford(8), "mad": Welford(8, scale="mad")}
    times = {k: [] for k in runs}
    for _ in range(a.repeats + 5):  # the first 5 rounds are warm-up
        for k, w in runs.items():
            times[k].append(one_step(w, loss, turns, cfg, a.device))
    if rank == 0:
        out.update({k: statistics.median(v[5:]) for k, v in times.items()})
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--turns", type=int, default=64, help="complete turns per rank and micro-step (a multiple of 8)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as m:
        out = m.dict()
        mp.spawn(worker, args=(a.ranks, port, a, out), nprocs=a.ranks)
        res = dict(out)
    print(f"{a.ranks} ranks ({a.device}), {a.turns} turns per rank and micro-step, median of {a.repeats}")
    print(f"weights + merge per micro-step: std {res['std'] * 1e3:.2f} ms   mad {res['mad'] * 1e3:.2f} ms   "
          f"ratio {res['mad'] / res['std']:.2f}")


if __name__ == "__main__":
    main()
