"""`resure-ds plan`'s estimate against the memory a run of the same recipe takes here.

For each setting (micro-batch x row length), two fresh ranks (gloo on CPU, NCCL on two GPUs) build
the recipe's engine on the embedded SmolLM2-135M-Instruct (ZeRO-3, fp32 by default) and run the
recipe's own step (step.py) on packed rows of real chitchat dialogues for a few optimizer steps.
Per rank, the memory the engine and the steps added: on CPU the resident-set high-water mark
(reset just before the engine is built: /proc/self/clear_refs) minus the resident set at that
moment; on a GPU torch.cuda.max_memory_allocated. Beside it, what plan.estimate says for the same
config on 2 GPUs of one node: model states, DeepSpeed's buffers and activations (its CUDA context
term left out, there is none on CPU). On CPU the resident set counts only the pages written, so
the part of DeepSpeed's gradient bucket that a small model never fills is planned but not
measured. The plan is an estimate of a GPU's memory; on CPU the same tensors live in host memory,
next to what the allocator and gloo keep, so a ratio near 1 says the arithmetic holds, not more
(docs/performance.md, "The plan against a run", says which terms differ here).

    python benchmarks/plan_memory.py                                  # 2x256 (the default) and 2x1024
    python benchmarks/plan_memory.py --settings 2x256 --results benchmarks/results/plan_memory-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MIB = 2 ** 20


def overrides(model_path: str, micro: int, length: int, dtype: str, checkpointing: bool) -> list[str]:
    return [f"model.path={model_path}", f"model.dtype={dtype}", "train.zero_stage=3",
            f"train.micro_batch_size={micro}", f"data.max_length={length}",
            f"model.gradient_checkpointing={str(checkpointing).lower()}"]


def packed_rows(tok, micro: int, length: int) -> list:
    """micro rows of exactly `length` tokens, each filled with whole chitchat dialogues in order and
    the last one cut to fit (what packing makes of the corpus)."""
    from resure_ds.data.records import read_dialogues
    from resure_ds.data.render import Renderer

    render, rows, row, used = Renderer(tok, None), [], [], 0
    for d in read_dialogues("chitchat", skip_invalid=True):
        ex = render.render(d)
        if ex is None:
            continue
        take = min(len(ex.input_ids), length - used)
        ex.input_ids, ex.turn_ids = ex.input_ids[:take], ex.turn_ids[:take]
        row.append(ex)
        used += take
        if used == length:
            rows.append(row)
            row, used = [], 0
            if len(rows) == micro:
                return rows
    raise RuntimeError("the corpus is too small for these rows")


def rss_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field + ":"))


def worker(rank, world, args):
    from resure_ds.config import load_config
    from resure_ds.data.collate import collate
    from resure_ds.models import load_tokenizer
    from resure_ds.report.audit import AuditLog
    from resure_ds.runtime import engine as ds
    from resure_ds.runtime.sequence import SequenceParallel
    from resure_ds.stats.method import Method
    from resure_ds.step import Stepper

    model_path, micro, length, dtype, checkpointing, steps = args
    cfg = load_config(None, overrides(model_path, micro, length, dtype, checkpointing))
    tok = load_tokenizer(model_path)
    batch = collate(packed_rows(tok, micro, length), tok.pad_token_id, packed=True)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # the resident-set high-water mark starts again from here
        before = rss_bytes("VmRSS")
    engine = ds.Engine(cfg, model_path)
    with tempfile.TemporaryDirectory() as tmp:
        stepper = Stepper(cfg, engine, Method(cfg), AuditLog(tmp, rank), ["chitchat"], rank,
                          SequenceParallel(1, rank, world))
        for step in range(1, steps + 1):
            stepper.micro_backward(batch, step, max(stepper.global_token_count([batch]), 1), {})
            engine.step()
    peak = torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM")
    return {"peak_above_start_bytes": peak - before}


def planned(model_path: str, micro: int, length: int, dtype: str, checkpointing: bool, world: int) -> dict:
    from resure_ds.config import load_config
    from resure_ds.runtime.memory import estimate, model_shape

    cfg = load_config(None, overrides(model_path, micro, length, dtype, checkpointing))
    return estimate(model_shape(model_path, cfg), cfg, world, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="2x256,2x1024", help="micro-batch x row length, comma-separated")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--checkpointing", action="store_true", help="model.gradient_checkpointing=true")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--results", default=None, help="write the JSON here too")
    ap.add_argument("--model", default=None, help="a model folder (default: the embedded SmolLM2-135M-Instruct)")
    a = ap.parse_args()
    from resure_ds.models import EMBEDDED, resolve_model_path
    from tests.dist import run_ranks

    model, world = a.model or resolve_model_path(EMBEDDED), 2
    backend = "nccl" if torch.cuda.device_count() >= world else "gloo"
    rows = []
    for setting in a.settings.split(","):
        micro, length = (int(x) for x in setting.split("x"))
        args = (model, micro, length, a.dtype, a.checkpointing, a.steps)
        with tempfile.TemporaryDirectory() as out:
            res = run_ranks(worker, world, (args,), out, backend=backend)
        plan = planned(model, micro, length, a.dtype, a.checkpointing, world)
        measured = max(r["peak_above_start_bytes"] for r in res)
        est = plan["states"] + plan["buffers"] + plan["activations"]
        rows.append({"micro_batch_size": micro, "max_length": length,
                     "plan_states_mib": round(plan["states"] / MIB), "plan_buffers_mib": round(plan["buffers"] / MIB),
                     "plan_activations_mib": round(plan["activations"] / MIB),
                     "plan_mib": round(est / MIB), "measured_peak_mib": round(measured / MIB),
                     "measured_over_plan": round(measured / est, 2)})
        r = rows[-1]
        print(f"{micro} x {length}: plan {r['plan_mib']} MiB per rank (states {r['plan_states_mib']} + buffers "
              f"{r['plan_buffers_mib']} + activations {r['plan_activations_mib']}), measured peak "
              f"{r['measured_peak_mib']} MiB above start: {r['measured_over_plan']}x", file=sys.stderr, flush=True)
    out = {"device": torch.cuda.get_device_name(0) if backend == "nccl" else f"cpu ({platform.machine()})",
           "model": a.model or "SmolLM2-135M-Instruct (embedded)", "ranks": world, "zero_stage": 3, "dtype": a.dtype,
           "gradient_checkpointing": a.checkpointing, "steps": a.steps, "results": rows}
    if a.results:
        with open(a.results, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
