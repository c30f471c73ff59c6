"""On a lent GPU: the recipe at ZeRO-3 bf16 with packing against a plain bf16 torch loop, same tokens.

A Llama of SmolLM2-360M's shape (960 hidden, 32 layers, 15 heads, 5 KV heads,
2560 MLP, tied embeddings), initialised at random here from SmolLM2's
config (.gpu/smollm2, benchmarks/gpu/prepare.py): no weights travel.
chitchat packed into rows of --length tokens, --rows rows per step:

  recipe   launch/train.sh, 1 rank, ZeRO-3, bf16, DeepSpeed's fused Adam,
           train.method=resure, the fused head and loss; --steps steps
  plain    the model's own loss, torch's fused AdamW, clipping, on the recipe's
           own packed batches (the same rows, so the same tokens)

--zero 3 0 also times the recipe at ZeRO-0 (one GPU has nothing to shard, so the
difference is what ZeRO-3's gather/release hooks cost), and so on for each stage named.

Prints real tokens/s of each (first --warmup steps not timed), their ratio,
model FLOP utilisation (6 x parameters x tokens/s over the card's dense bf16
peak; attention FLOPs left out, so it is a lower bound), and the recipe's
time split per step. Writes bench.json under --out.

    python benchmarks/gpu/bench.py [--steps 50] [--length 2048] [--rows 8] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from benchmarks.throughput import SEED, plain, recipe, summarize  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def make_model(out_dir: str, tiny: bool) -> tuple[str, int]:
    """SmolLM2-360M's shape (SmolLM2's config: tied embeddings), random weights, saved in bf16."""
    import torch

    from resure_ds.models import SMOLLM2_360M, TINY, random_llama

    src = os.environ.get("RESURE_GPU_TOKENIZER", os.path.join(ROOT, ".gpu", "smollm2"))
    path = os.path.join(out_dir, "llama-tiny-random" if tiny else "llama-360m-random")
    return path, random_llama(src, path, TINY if tiny else SMOLLM2_360M, torch.bfloat16, SEED)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--plain-steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--zero", type=int, nargs="+", default=[3], choices=[0, 1, 2, 3],
                    help="ZeRO stages to time the recipe at; the first is compared with the plain loop")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model: a dry run of the script (CPU or GPU)")
    a = ap.parse_args()
    import torch

    os.makedirs(a.out, exist_ok=True)
    work = os.path.join(ROOT, "benchmarks", "work", "gpu")
    os.makedirs(work, exist_ok=True)
    path, n_params = make_model(work, a.tiny)
    stages = {z: summarize(recipe("resure-packed", a.length, a.rows, a.steps, quiet=False,
                                  overrides=(f"model.path={path}", f"model.dtype={a.dtype}", f"train.zero_stage={z}")),
                           a.warmup) for z in a.zero}
    r = stages[a.zero[0]]
    p = summarize(plain(a.length, a.rows, a.plain_steps + a.warmup, model_path=path,
                        overrides=(f"model.dtype={a.dtype}",)), a.warmup)
    r_tok, p_tok = r["tokens_per_s"], p["tokens_per_s"]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    res = {"gpu": name, "params": n_params, "length": a.length, "rows": a.rows, "recipe_tokens_per_s": r_tok,
           "plain_tokens_per_s": p_tok, "plain_over_recipe": p_tok / r_tok,
           "recipe_step_s": r["step_s"], "plain_step_s": p["step_s"],
           "recipe_mfu": 6 * n_params * r_tok / peak if peak else None,
           "plain_mfu": 6 * n_params * p_tok / peak if peak else None, "recipe_split_s": r["split"],
           "zero_stage": a.zero[0], "by_zero_stage": {str(z): {"tokens_per_s": v["tokens_per_s"], "step_s": v["step_s"],
                                                               "split_s": v["split"]} for z, v in stages.items()}}
    print(json.dumps(res, indent=1))
    print(f"{name}: recipe {r_tok:,.0f} real tokens/s, plain {a.dtype} loop {p_tok:,.0f}; plain / recipe "
          f"{p_tok / r_tok:.2f}x" + (f"; MFU recipe {res['recipe_mfu']:.1%}, plain {res['plain_mfu']:.1%}" if peak else ""))
    for z, v in stages.items():
        print(f"recipe at ZeRO-{z}: {v['tokens_per_s']:,.0f} real tokens/s, {v['step_s']:.3f} s a step")
    with open(os.path.join(a.out, "bench.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
