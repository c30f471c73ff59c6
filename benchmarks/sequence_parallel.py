"""train.sequence_parallel side by side: peak memory per rank and tokens/s of one long row, SP=1 vs SP=2.

Two ranks either way (gloo on CPU, NCCL on GPUs), ZeRO-3, the recipe's own step (step.py):
SP=1 gives each rank a row of its own (data parallel), SP=2 cuts one row over both ranks (Ulysses).
The row is real: the longest embedded chitchat dialogue, rendered whole and cut to each length.
For each (SP, length), a fresh pair of processes runs 3 optimizer steps; per rank it records the
peak resident memory above what it held before the first step (CPU: the RSS high-water mark; GPU:
torch.cuda.max_memory_allocated), and the tokens/s of the last two steps (tokens of the global
batch, i.e. 2 rows under SP=1 and 1 under SP=2, over the step time). Then, for a memory budget per
rank, the longest length that stayed within it under each SP.

    python benchmarks/sequence_parallel.py                      # tiny 2-layer model, 1k-8k tokens
    python benchmarks/sequence_parallel.py --shape 576,1536,8,8,4,64 --lengths 2048,4096,8192,16384

SP=2 needs two ranks: two GPUs under NCCL, or CPU processes under gloo. On one GPU, --ranks 1
measures SP=1's long-row memory and speed alone (benchmarks/gpu/run.sh does).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def longest_dialogue(tok):
    from resure_ds.data.records import read_dialogues
    from resure_ds.data.render import Renderer

    ds = list(read_dialogues("chitchat", skip_invalid=True))
    d = max(ds, key=lambda d: sum(len(m["content"]) for m in d.messages))
    return Renderer(tok, None).render(d)


def peak_bytes(dev) -> int:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(rank, world, model_path, sp, length, steps):
    from resure_ds.config import load_config
    from resure_ds.data.collate import collate
    from resure_ds.models import load_tokenizer
    from resure_ds.report.audit import AuditLog
    from resure_ds.runtime import engine as ds
    from resure_ds.runtime.sequence import SequenceParallel
    from resure_ds.stats.method import Method
    from resure_ds.step import Stepper

    cfg = load_config(None, [f"model.path={model_path}", "model.dtype=fp32", "train.method=resure",
                             "train.micro_batch_size=1", "train.zero_stage=3", f"train.sequence_parallel={sp}",
                             f"data.max_length={length}"])
    engine = ds.Engine(cfg, model_path)
    group = SequenceParallel(sp, rank, world)
    group.install(engine.module.config, engine.attention)
    tok = load_tokenizer(model_path)
    ex = longest_dialogue(tok)
    ex.input_ids, ex.turn_ids = ex.input_ids[:length], ex.turn_ids[:length]
    assert len(ex.input_ids) == length, f"the longest dialogue has {len(ex.input_ids)} tokens"
    batch = collate([[ex]], tok.pad_token_id, packed=True)
    with tempfile.TemporaryDirectory() as tmp:
        stepper = Stepper(cfg, engine, Method(cfg), AuditLog(tmp, rank), ["chitchat"], rank, group)
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.device)
        before, times = peak_bytes(engine.device), []
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            stepper.micro_backward(batch, step, max(stepper.global_token_count([batch]), 1), {})
            engine.step()
            times.append(time.perf_counter() - t0)
    return {"peak_above_start_bytes": peak_bytes(engine.device) - before, "step_s": times}


def measure(model_path: str, sp: int, length: int, steps: int, ranks: int) -> dict:
    from tests.dist import run_ranks

    with tempfile.TemporaryDirectory() as out:
        res = run_ranks(worker, ranks, (model_path, sp, length, steps), out,
                        backend="nccl" if torch.cuda.device_count() >= ranks else "gloo")
    step_s = max(sum(r["step_s"][1:]) / (steps - 1) for r in res)
    tokens = length * (ranks // sp)  # the global batch: a row per data-parallel rank
    return {"sp": sp, "length": length, "peak_mib_per_rank": round(max(r["peak_above_start_bytes"] for r in res) / 2**20),
            "tokens_per_s": round(tokens / step_s, 1), "step_s": round(step_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="64,128,2,4,2,16",
                    help="hidden,intermediate,layers,heads,kv heads,head dim of a random Llama with SmolLM2's "
                         "tokenizer (heads and kv heads divisible by 2)")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--budget-mib", type=int, default=1024, help="memory per rank for the longest-row answer")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--results", default=None, help="write the JSON here too")
    ap.add_argument("--ranks", type=int, default=2, choices=[1, 2],
                    help="1: SP=1 alone, on one GPU (two ranks need two GPUs with NCCL)")
    a = ap.parse_args()
    from resure_ds.models import EMBEDDED, resolve_model_path
    from resure_ds.testing import random_llama

    with tempfile.TemporaryDirectory() as model:
        src = os.environ.get("RESURE_GPU_TOKENIZER") or resolve_model_path(EMBEDDED)  # (the GPU machine's copy)
        random_llama(src, model, tuple(int(x) for x in a.shape.split(",")))
        rows = []
        for length in (int(x) for x in a.lengths.split(",")):
            for sp in (1, 2)[:a.ranks]:
                rows.append(measure(model, sp, length, a.steps, a.ranks))
                r = rows[-1]
                print(f"SP={sp} length {length:6d}: peak {r['peak_mib_per_rank']:6d} MiB per rank above start, "
                      f"{r['tokens_per_s']:8.1f} tokens/s ({r['step_s']} s a step)", file=sys.stderr, flush=True)
    longest = {sp: max([r["length"] for r in rows if r["sp"] == sp and r["peak_mib_per_rank"] <= a.budget_mib],
                       default=None) for sp in (1, 2)[:a.ranks]}
    print(f"longest row within {a.budget_mib} MiB per rank: "
          + ", ".join(f"SP={k} {v}" for k, v in longest.items()), file=sys.stderr)
    out = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "ranks": a.ranks,
           "shape": a.shape, "budget_mib": a.budget_mib,
           "longest_within_budget": longest, "results": rows}
    if a.results:
        with open(a.results, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
