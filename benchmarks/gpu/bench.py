"""On a lent GPU: where the recipe's time goes, row by row, against a plain loop and TRL on the same card.

Llamas of SmolLM2's family initialised at random from SmolLM2's config (.gpu/smollm2,
benchmarks/gpu/prepare.py; no weights travel): SmolLM2-360M's shape and SmolLM2-1.7B's. chitchat
packed into --rows rows of --length tokens a step, bf16, one GPU. Each row runs in its own process,
one after another, and its result is appended to OUT/bench.jsonl the moment it exists (its output
to OUT/rows/NAME.log; a recipe row's two profiled steps, train.profile_steps, to
OUT/rows/NAME.profile.txt: top kernels and host gaps); a row that fails is recorded as failed and the next one runs; rows that
would start after --budget-s are recorded as skipped. At the end: a table (OUT/bench.txt) with
real tokens/s, seconds a step, MFU (6 x parameters x tokens/s over the card's dense bf16 peak;
attention FLOPs left out, so a lower bound) and the issue's ratios; OUT/bench.json holds it all.

Rows (run in the order of ROWS below, what the targets need first):
  plain-mask       a plain bf16 torch loop on the recipe's own packed batches (the model's own
                   loss, torch's fused AdamW, clipping), sdpa under the block-diagonal mask
  plain-varlen     the same with attention per dialogue (model.attn_implementation=varlen)
  recipe-z0        the recipe (launch/train.sh, 1 rank, train.method=resure, fused head and loss,
                   DeepSpeed's fused Adam, attention auto: varlen on a GPU) at ZeRO-0
  recipe-z3        at ZeRO-3 (the embedded default's stage)
  recipe-z3-tuned  ZeRO-3 with its tunables set for one card and this model size: every parameter
                   persistent (threshold above the largest layer: nothing re-gathered), overlap_comm,
                   prefetch and reduce buckets of 5e8, max live parameters 1e9
  recipe-z2        at ZeRO-2
  recipe-z0-mask   ZeRO-0 with sdpa under the mask (what attention per dialogue saves)
  recipe-z0-logits ZeRO-0 with the logits path (model.fused_loss=false)
  recipe-z0-compile ZeRO-0 with model.compile=true (each transformer block compiled); -z3-compile
                   the same at ZeRO-3
  plain-compile    the plain loop (varlen) under torch.compile
  trl              TRL's SFTTrainer on the same model and chitchat (packing, padding-free: position
                   ids), --rows x --length a step, its sdpa attention
  1.7b-*           plain-varlen, recipe-z0, recipe-z3, trl at SmolLM2-1.7B's shape (24 layers,
                   2,048 hidden, 8,192 MLP, 32 heads)

    python benchmarks/gpu/bench.py [--budget-s 420] [--only ROW ...] [--out DIR] [--tiny]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from benchmarks.throughput import SEED, child_env, plain, recipe, summarize, trl  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
SMOLLM2_1_7B = (2048, 8192, 24, 32, 32, 64)
RECIPE = "recipe"
ROWS = {  # name: (kind, overrides), in the order they run: what the targets need first
    "plain-varlen": ("plain", ("model.attn_implementation=varlen",)),
    "recipe-z0": (RECIPE, ("train.zero_stage=0",)),
    "recipe-z3": (RECIPE, ("train.zero_stage=3",)),
    "plain-mask": ("plain", ("model.attn_implementation=sdpa",)),
    "1.7b-plain-varlen": ("plain", ("model.attn_implementation=varlen",)),
    "1.7b-recipe-z0": (RECIPE, ("train.zero_stage=0",)),
    "recipe-z3-tuned": (RECIPE, ("train.zero_stage=3", "TUNED")),
    "trl": ("trl", ()),
    "recipe-z0-mask": (RECIPE, ("train.zero_stage=0", "model.attn_implementation=sdpa")),
    "recipe-z2": (RECIPE, ("train.zero_stage=2",)),
    "recipe-z0-logits": (RECIPE, ("train.zero_stage=0", "model.fused_loss=false")),
    "1.7b-recipe-z3": (RECIPE, ("train.zero_stage=3",)),
    "1.7b-trl": ("trl", ()),
    "recipe-z0-compile": (RECIPE, ("train.zero_stage=0", "model.compile=true")),
    "recipe-z3-compile": (RECIPE, ("train.zero_stage=3", "model.compile=true")),
    "plain-compile": ("plain", ("model.attn_implementation=varlen", "COMPILE")),
}


def make_model(work: str, name: str, tiny: bool) -> tuple[str, int]:
    """A Llama of SmolLM2's family at a row's size (360M, or 1.7B for 1.7b-* rows), random weights
    in bf16, made once."""
    import torch

    from resure_ds.testing import SMOLLM2_360M, TINY, random_llama

    big = name.startswith("1.7b-")
    shape = TINY if tiny else SMOLLM2_1_7B if big else SMOLLM2_360M
    path = os.path.join(work, "llama-tiny-random" if tiny else "llama-1.7b-random" if big else "llama-360m-random")
    done = os.path.join(path, "params.txt")
    if not os.path.exists(done):
        src = os.environ.get("RESURE_GPU_TOKENIZER", os.path.join(ROOT, ".gpu", "smollm2"))
        n = random_llama(src, path, shape, torch.bfloat16, SEED)
        with open(done, "w", encoding="utf-8") as f:
            f.write(str(n))
    with open(done, encoding="utf-8") as f:
        return path, int(f.read())


def tuned_ds_config(work: str, model_path: str) -> str:
    """ZeRO-3's tunables for one card and this model: nothing released between uses."""
    from resure_ds.config import load_config
    from resure_ds.runtime.memory import model_shape

    s = model_shape(model_path, load_config(None, []))
    conf = {"zero_optimization": {"stage3_param_persistence_threshold": s.largest_layer + 1, "overlap_comm": True,
                                  "stage3_prefetch_bucket_size": 5e8, "reduce_bucket_size": 5e8,
                                  "stage3_max_live_parameters": 1e9}}
    path = os.path.join(work, "ds_tuned.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(conf, f)
    return path


def run_row(name: str, a) -> dict:
    """One row, in this process: its timings summarised."""
    kind, extra = ROWS[name]
    work = os.path.join(ROOT, "benchmarks", "work", "gpu")
    os.makedirs(work, exist_ok=True)
    path, n_params = make_model(work, name, a.tiny)
    dtype = f"model.dtype={a.dtype}"
    overrides = [o for o in extra if o not in ("TUNED", "COMPILE")]
    if "TUNED" in extra:
        overrides.append(f"train.ds_config={tuned_ds_config(work, path)}")
    steps = a.steps + a.warmup
    if kind == "plain":
        res = plain(a.length, a.rows, steps, model_path=path, overrides=(dtype, *overrides), compile="COMPILE" in extra)
    elif kind == "trl":
        res = trl(True, a.length, a.rows, steps, model_path=path, dtype=a.dtype)
    else:  # two timed steps profiled (the median of the timed steps stands)
        prof = a.warmup + a.steps // 2
        res = recipe("resure-packed", a.length, a.rows, steps, quiet=False, run_name=f"bench-{name}",
                     overrides=(f"model.path={path}", dtype, f"train.profile_steps={prof}-{prof + 1}", *overrides))
        if os.path.exists(os.path.join(res["dir"], "profile.txt")):
            shutil.copy(os.path.join(res["dir"], "profile.txt"), os.path.join(a.out, "rows", f"{name}.profile.txt"))
    out = summarize(res, a.warmup)
    out["params"] = n_params
    return out


def table(rows: dict, gpu: str, peak: float | None, dtype: str) -> str:
    lines = [f"{gpu}: real tokens/s, {dtype}, one card (MFU = 6 x params x tokens/s / {peak or 0:.3g}, a lower bound)",
             f"{'row':20s} {'tokens/s':>10s} {'s/step':>8s} {'MFU':>6s}  note"]

    def mfu(r: dict) -> str:
        return f"{6 * r['params'] * r['tokens_per_s'] / peak:.1%}" if peak else "-"

    for name, r in rows.items():
        if r.get("status") != "ok":
            lines.append(f"{name:20s} {'-':>10s} {'-':>8s} {'-':>6s}  {r.get('status')}: {r.get('why', '')[:80]}")
            continue
        lines.append(f"{name:20s} {r['tokens_per_s']:10,.0f} {r['step_s']:8.3f} {mfu(r):>6s}")
    tok = {n: r["tokens_per_s"] for n, r in rows.items() if r.get("status") == "ok"}

    def ratio(label: str, a: str, b: str, target: str) -> None:
        if a in tok and b in tok:
            lines.append(f"{label:58s} {tok[a] / tok[b]:6.2f}x  (target {target})")

    lines.append("")
    big = rows.get("1.7b-plain-varlen", {})
    if peak and big.get("status") == "ok":
        lines.append(f"{'1.7b plain loop (varlen) MFU':58s} {mfu(big):>6s}  (target >= 35%)")
    for p in ("", "1.7b-"):
        best = max((n for n in tok if n.startswith(p + "recipe-")), key=tok.get, default=None)
        if best:
            ratio(f"{p}recipe's best ({best}) / plain loop (varlen), tokens/s", best, p + "plain-varlen", ">= 0.9")
            ratio(f"{p}plain loop (varlen) / recipe at ZeRO-3", p + "plain-varlen", p + "recipe-z3", "<= 1.5")
            ratio(f"{p}recipe's best / TRL", best, p + "trl", ">= 1.3")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="timed steps a row")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--only", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--budget-s", type=float, default=420, help="no row starts after this many seconds")
    ap.add_argument("--row-timeout-s", type=float, default=240)
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model: a dry run of the script (CPU or GPU)")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.row:
        print("RESULT " + json.dumps(run_row(a.row, a)), flush=True)
        return
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    os.makedirs(os.path.join(a.out, "rows"), exist_ok=True)
    t0, results = time.monotonic(), {}
    passed = [f"--{k}={v}" for k, v in (("steps", a.steps), ("warmup", a.warmup), ("length", a.length),
                                        ("rows", a.rows), ("dtype", a.dtype), ("out", a.out))] + (["--tiny"] if a.tiny else [])
    for name in a.only:
        left = a.budget_s - (time.monotonic() - t0)
        if left <= 0:
            r = {"status": "skipped", "why": f"the {a.budget_s:.0f} s budget was spent"}
        elif ROWS[name][0] == "trl" and importlib.util.find_spec("trl") is None:  # no row process to start
            r = {"status": "failed", "why": "ModuleNotFoundError: No module named 'trl' (the prepared .gpu/ "
                                            "carries its wheel; else pip install -r benchmarks/requirements.txt)"}
        else:
            r = measure(name, passed, min(a.row_timeout_s, left), a.out)
        r["row"] = name
        results[name] = r
        with open(os.path.join(a.out, "bench.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{name}: {r['status']} {r.get('tokens_per_s', '')} ({time.monotonic() - t0:.0f} s)", flush=True)
    text = table(results, gpu, peak, a.dtype)
    print(text, flush=True)
    with open(os.path.join(a.out, "bench.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "bench.json"), "w", encoding="utf-8") as f:
        json.dump({"gpu": gpu, "peak_bf16": peak, "length": a.length, "rows": a.rows, "dtype": a.dtype,
                   "results": results}, f, indent=1)


def measure(name: str, passed: list[str], timeout: float, out: str) -> dict:
    """One row in a child process (a fresh CUDA context, nothing left from the last row)."""
    log = os.path.join(out, "rows", f"{name}.log")
    t = time.monotonic()
    with open(log, "w", encoding="utf-8") as f:
        # its own process group: a timeout ends the launcher's ranks too, which hold the GPU
        p = subprocess.Popen([sys.executable, __file__, "--row", name, *passed], cwd=ROOT, stdout=f,
                             stderr=subprocess.STDOUT, start_new_session=True,
                             env=child_env(PYTHONUNBUFFERED="1"))
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return {"status": "failed", "why": f"timed out after {timeout:.0f} s (see rows/{name}.log)"}
    with open(log, encoding="utf-8") as f:
        text = f.read()
    line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["no output"]
        return {"status": "failed", "why": f"exit {p.returncode}: {tail[0]}"}
    return {"status": "ok", "wall_s": time.monotonic() - t, **json.loads(line[7:])}


if __name__ == "__main__":
    main()
