"""LoRA against full fine-tuning, side by side in one run: the recipe on the embedded
SmolLM2-135M-Instruct, the same packed batches, ZeRO-3, one rank; trainable parameters,
seconds per step (first --warmup steps not timed) and their ratio.

    python benchmarks/lora_step.py [--steps 8] [--warmup 2] [--length 256] [--rows 4] [--rank 16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.throughput import recipe, summarize  # noqa: E402


def trainable(rank: int, alpha: float) -> tuple[int, int]:
    """(trainable, total) parameters of the embedded model with the adapters the run attaches."""
    from transformers import AutoModelForCausalLM

    from resure_ds.config import LoraConfig
    from resure_ds.runtime.lora import attach
    from resure_ds.models import EMBEDDED, resolve_model_path

    return attach(AutoModelForCausalLM.from_pretrained(resolve_model_path(EMBEDDED)), LoraConfig(rank=rank, alpha=alpha))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    a = ap.parse_args()
    common = ("train.zero_stage=3",)
    full = summarize(recipe("resure-packed", a.length, a.rows, a.steps, overrides=common), a.warmup)
    lora = summarize(recipe("resure-packed", a.length, a.rows, a.steps,
                            overrides=(*common, f"model.lora.rank={a.rank}", "model.lora.alpha=32")), a.warmup)
    n_lora, n_all = trainable(a.rank, 32.0)
    n_base = n_all - n_lora  # what full fine-tuning trains: the model's own parameters
    res = {"rank": a.rank, "trainable_lora": n_lora, "trainable_full": n_base, "length": a.length, "rows": a.rows, "full_step_s": full["step_s"],
           "lora_step_s": lora["step_s"], "lora_over_full": lora["step_s"] / full["step_s"],
           "full_split_s": full["split"], "lora_split_s": lora["split"]}
    print(json.dumps(res, indent=1))
    print(f"trainable: full {n_base:,}, LoRA r={a.rank} {n_lora:,} ({n_lora / n_base:.2%}); step: full "
          f"{full['step_s']:.2f} s, LoRA {lora['step_s']:.2f} s, LoRA / full {res['lora_over_full']:.2f}x")


if __name__ == "__main__":
    main()
