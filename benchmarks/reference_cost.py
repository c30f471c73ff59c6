"""The reference pass (stats.reference) beside the training step, on the same machine and rows, one
process each: the scorer's forward tokens/s against a training step's tokens/s, what scoring costs as
a share of an epoch, and how the rows split over the tasks of a multi-task scoring.

    python benchmarks/reference_cost.py [--dialogues 512] [--steps 5]

The data: the first N embedded chitchat dialogues with an assistant turn, as one JSONL file,
prepared with the default recipe (max_length 256, overflow split). The scorer: resure_ds.eval.score's
own score_rows with the run's model (the embedded SmolLM2-135M-Instruct) at model.dtype=auto, timed
over every row. Training: launch/train.sh on one rank, the default recipe, the same data, the median
step of steps 2..N (the first pays warm-up). Results: benchmarks/results/reference_cost.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WORK = os.path.join(ROOT, "benchmarks", "work", "reference_cost")
OUT = os.path.join(ROOT, "benchmarks", "results", "reference_cost.json")
PY = sys.executable


def log(*a):
    print("[reference_cost]", *a, file=sys.stderr, flush=True)


def corpus(n: int) -> str:
    from resure_ds.data.records import read_dialogues

    path = os.path.join(WORK, f"chitchat-{n}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for _, d in zip(range(n), read_dialogues("chitchat", skip_invalid=True)):
            f.write(json.dumps({"id": d.dialogue_id, "messages": d.messages}) + "\n")
    return path


def score_speed(data: str) -> dict:
    import numpy as np

    from resure_ds.config import load_config
    from resure_ds.data.prepare import ensure_prepared
    from resure_ds.data.shards import PreparedSource
    from resure_ds.eval.score import BATCH_TOKENS, load_reference, score_rows
    from resure_ds.models import load_tokenizer, resolve_model_path
    from resure_ds.runtime import bf16
    from resure_ds.runtime.engine import native_bf16, resolve_dtype

    cfg = load_config(os.path.join(ROOT, "recipes", "default.yaml"),
                      [f"data.train={data}", f"data.prepared_dir={WORK}/prepared"])
    model_path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(model_path, cfg.model.chat_template, cfg.model.trust_remote_code)
    [p] = ensure_prepared(cfg, tok, model_path, progress=False)
    src = PreparedSource(p.folder)
    rows = np.arange(len(src), dtype=np.int64)
    dtype = resolve_dtype(cfg)
    matmul = bf16.resolve(cfg.model.bf16_matmul, dtype, native_bf16())  # as the recipe's scoring computes
    model = load_reference(model_path, dtype, cfg, matmul)
    with bf16.products(matmul):
        score_rows(model, src, rows[:32], tok.pad_token_id, BATCH_TOKENS)  # warm-up
        t = time.perf_counter()
        score_rows(model, src, rows, tok.pad_token_id, BATCH_TOKENS)
    dt = time.perf_counter() - t
    tokens = int(src.lengths.sum())
    split = {}
    for tasks in (2, 8, 64):
        per = [int(src.lengths[k::tasks].sum()) for k in range(tasks)]
        split[tasks] = {"max_over_mean_tokens": max(per) / statistics.mean(per)}
    return {"rows": len(src), "tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt, "dtype": dtype,
            "fused_head": bool(model.fused), "task_split": split, "prepared": p.folder}


def train_speed(data: str, steps: int) -> dict:
    out_dir = os.path.join(WORK, "runs")
    shutil.rmtree(out_dir, ignore_errors=True)
    env = {**os.environ, "PATH": os.path.dirname(PY) + os.pathsep + os.environ["PATH"], "PYTHON": PY,
           "NUM_PROCS": "1"}
    args = ["recipes/default.yaml", f"data.train={data}", f"data.prepared_dir={WORK}/prepared",
            f"train.max_steps={steps}", "checkpoint.every=0", "checkpoint.export=false", "output.plot=false",
            "output.report=false", f"output.dir={out_dir}", "output.name=train"]
    subprocess.run(["bash", "launch/train.sh", *args], cwd=ROOT, env=env, check=True, capture_output=True)
    rows = [json.loads(x) for x in open(os.path.join(out_dir, "train", "metrics.jsonl")) if x.strip()][1:]
    tps = statistics.median(r["tokens_per_s"] for r in rows)
    return {"steps_timed": len(rows), "median_tokens_per_s": tps,
            "median_step_s": statistics.median(r["step_time_s"] for r in rows),
            "tokens_per_s": [r["tokens_per_s"] for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dialogues", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    data = corpus(a.dialogues)
    s = score_speed(data)
    log(f"reference pass: {s['rows']:,} rows, {s['tokens']:,} tokens in {s['seconds']:.1f} s: "
        f"{s['tokens_per_s']:,.0f} tokens/s ({s['dtype']}, fused head {s['fused_head']})")
    t = train_speed(data, a.steps)
    log(f"training: median {t['median_tokens_per_s']:,.0f} tokens/s over steps 2..{a.steps} "
        f"({t['median_step_s']:.1f} s a step)")
    ratio = s["tokens_per_s"] / t["median_tokens_per_s"]
    log(f"forward / training step tokens/s: {ratio:.2f}x; scoring a corpus once costs {100 / ratio:.0f}% of one "
        f"epoch of training on it; rows split over 8 tasks: the fullest task holds "
        f"{s['task_split'][8]['max_over_mean_tokens']:.3f}x the mean tokens")
    res = {"machine": f"{os.cpu_count()} CPU cores, {sys.platform}", "dialogues": a.dialogues, "score": s,
           "train": t, "forward_over_train_tokens_per_s": ratio, "epoch_share": 1 / ratio}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(res, f, indent=2, default=float)
    log(f"results: {OUT}")


if __name__ == "__main__":
    main()
