"""bf16 vs fp32 matrix-product speed on this machine's CPU: why model.dtype=auto
picks fp32 where bf16 is not native. The shape is SmolLM2-135M's LM head for
1,024 tokens ([1024, 576] x [576, 49152]), forward and the two backward products.

    python benchmarks/matmul_dtype.py      # about 4 minutes on an AVX2-only 2-core CPU
"""
from __future__ import annotations

import time

import torch


def gflops(f, flop: float, repeats: int = 2) -> float:
    f()
    best = min(_timed(f) for _ in range(repeats))
    return flop / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main() -> None:
    n, h, v = 1024, 576, 49152
    flop = 2.0 * n * h * v
    print(f"threads={torch.get_num_threads()}, cpu capability={torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16 (oneDNN)={torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    res = {}
    for dt in (torch.float32, torch.bfloat16):
        x, w, g = torch.randn(n, h, dtype=dt), torch.randn(v, h, dtype=dt), torch.randn(n, v, dtype=dt)
        res[dt] = {"forward x@w.T": gflops(lambda: x @ w.t(), flop),
                   "grad input g@w": gflops(lambda: g @ w, flop),
                   "grad weight g.T@x": gflops(lambda: g.t() @ x, flop)}
    for name in res[torch.float32]:
        a, b = res[torch.float32][name], res[torch.bfloat16][name]
        print(f"{name:18s} fp32 {a:7.1f} GFLOP/s   bf16 {b:7.1f} GFLOP/s   bf16/fp32 speed {b / a:.3f}")


if __name__ == "__main__":
    main()
