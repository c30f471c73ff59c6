#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine (no network) from the repository root, with .gpu/
# (made here by `python benchmarks/gpu/prepare.py`) carried along:
#
#   bash benchmarks/gpu/run.sh
#
# Installs the carried wheels, runs the suite's GPU tests (bf16 fused loss, NCCL, DeepSpeed's
# fused Adam), then benchmarks/gpu/bench.py: 50 steps of the recipe at ZeRO-3 bf16 with packing on
# a 360M Llama against a plain bf16 loop, and the recipe again at ZeRO-0; then SP=1's long-row
# memory and speed (benchmarks/sequence_parallel.py --ranks 1: SP=2 needs a second card). Results
# under $OUT (else benchmarks/gpu/out): gpu.txt, tests.txt, bench.txt, bench.json,
# sequence_parallel.txt and .json. Each part runs even if an earlier one failed; the status is
# the first failure's.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
OUT="${OUT:-benchmarks/gpu/out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
if [[ ! -d .gpu/wheels ]]; then
  echo "[resure_ds] .gpu/wheels is missing: run python benchmarks/gpu/prepare.py where pip works, and carry .gpu" >&2
  exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH" PYTHON="$PY" \
  RESURE_GPU_TOKENIZER="$PWD/.gpu/smollm2" PYTHONUNBUFFERED=1
status=0
# DeepSpeed JIT-builds its fused Adam and parses TORCH_CUDA_ARCH_LIST as digits: an image's "9.0a"
# stops it (ValueError: '0a'). Build for the card in hand.
TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)" \
  && export TORCH_CUDA_ARCH_LIST
echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/tests.txt"
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
"$PY" benchmarks/gpu/bench.py --zero 3 0 --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
[[ ${PIPESTATUS[0]} -eq 0 || $status -ne 0 ]] || status=1
# Sequence parallelism needs two GPUs for SP=2; on one card this measures SP=1's long-row memory and
# speed alone (a real chitchat dialogue rendered whole, a random 360M-shaped Llama, bf16 off: fp32).
"$PY" benchmarks/sequence_parallel.py --ranks 1 --shape 960,2560,32,15,5,64 --lengths 4096,8192,16384 \
  --budget-mib 65536 --results "$OUT/sequence_parallel.json" 2>&1 | tee "$OUT/sequence_parallel.txt"
[[ ${PIPESTATUS[0]} -eq 0 || $status -ne 0 ]] || status=1
exit "$status"
