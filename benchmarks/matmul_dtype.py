"""bf16 vs fp32 matrix-product speed on this machine's CPU, side by side in one run: why
model.dtype=auto picks fp32 where bf16 is not native, and what model.bf16_matmul=fp32 (bf16 operands,
products computed in fp32, results rounded to bf16: resure_ds/runtime/bf16.py) gives back.

Products: SmolLM2-135M's LM head for 1,024 tokens ([1024, 576] x [576, 49152]), forward and the two
backward products. Step (--step): the embedded model's forward and backward on --rows x --length
random tokens, fp32, bf16 and bf16 with fp32 products.

    python benchmarks/matmul_dtype.py                 # products: about 4 minutes on an AVX2-only 2-core CPU
    python benchmarks/matmul_dtype.py --step          # and the model's step (the bf16 one takes minutes there)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("fp32", "bf16", "bf16, fp32 products")


def gflops(f, flop: float, repeats: int = 2) -> float:
    f()
    best = min(_timed(f) for _ in range(repeats))
    return flop / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def _kind(kind: str):
    from resure_ds.runtime import bf16

    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    return dtype, (lambda: bf16.products("fp32" if kind.endswith("fp32 products") else "native"))


def products() -> None:
    n, h, v = 1024, 576, 49152
    flop = 2.0 * n * h * v
    res = {}
    for kind in KINDS:
        dt, mode = _kind(kind)
        x, w, g = torch.randn(n, h, dtype=dt), torch.randn(v, h, dtype=dt), torch.randn(n, v, dtype=dt)

        def under(f):
            def run():
                with mode():
                    f()
            return run
        res[kind] = {"forward x@w.T": gflops(under(lambda: x @ w.t()), flop),
                     "grad input g@w": gflops(under(lambda: g @ w), flop),
                     "grad weight g.T@x": gflops(under(lambda: g.t() @ x), flop)}
    for name in res["fp32"]:
        a, b, c = (res[k][name] for k in KINDS)
        print(f"{name:18s} fp32 {a:7.1f}   bf16 {b:7.1f}   bf16 fp32-products {c:7.1f} GFLOP/s   "
              f"speed against fp32: bf16 {b / a:.3f}, bf16 fp32-products {c / a:.3f}")


def step(model: str, rows: int, length: int, repeats: int) -> None:
    from transformers import AutoModelForCausalLM

    from resure_ds.models import resolve_model_path

    path = resolve_model_path(model)
    ids = torch.randint(0, 1000, (rows, length), generator=torch.Generator().manual_seed(0))
    secs = {}
    for kind in KINDS:
        dt, mode = _kind(kind)
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation="sdpa")

        def once():
            with mode():
                m(input_ids=ids, labels=ids).loss.backward()
        once()  # warm-up
        secs[kind] = min(_timed(once) for _ in range(repeats))
        print(f"step {kind:20s} {secs[kind]:8.2f} s  ({rows} x {length} tokens, forward and backward)", flush=True)
    print(f"step time against fp32: bf16 {secs['bf16'] / secs['fp32']:.2f}x, "
          f"bf16 fp32-products {secs['bf16, fp32 products'] / secs['fp32']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", action="store_true", help="also the model's forward and backward")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    print(f"threads={torch.get_num_threads()}, cpu capability={torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16 (oneDNN)={torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    products()
    if a.step:
        step(a.model, a.rows, a.length, a.repeats)


if __name__ == "__main__":
    main()
