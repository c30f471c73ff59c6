#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine (no network) from the repository root, with .gpu/
# (made here by `python benchmarks/gpu/prepare.py`) carried along:
#
#   bash benchmarks/gpu/run.sh            # about 8 minutes; RESURE_GPU_BUDGET_S=480 sets it
#
# Installs the carried wheels, runs the suite's GPU tests (bf16 fused loss, NCCL, DeepSpeed's
# fused Adam, the varlen attention kernel against the mask), then benchmarks/gpu/bench.py: the
# recipe at ZeRO-0/2/3 (and ZeRO-3 tuned), with and without attention per dialogue, the fused head
# and torch.compile, against a plain bf16 loop and TRL on the same batches, at SmolLM2-360M's and
# -1.7B's shapes, 8 x 4,096 packed; then, if time is left, SP=1's long-row memory and speed
# (benchmarks/sequence_parallel.py --ranks 1: SP=2 needs a second card). Results under $OUT (else
# benchmarks/gpu/out), each written as it is made: gpu.txt, tests.txt, bench.jsonl (a line per row),
# rows/*.log, bench.txt (the table), bench.json, sequence_parallel.txt and .json. Each part runs
# even if an earlier one failed; the status is the first failure's.
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
BUDGET="${RESURE_GPU_BUDGET_S:-480}"
# pytest writes its own file (no pipe buffer between it and $OUT); its exit status is the part's
"$PY" -m pytest -q -m gpu tests/test_gpu.py > "$OUT/tests.txt" 2>&1 || status=1
tail -3 "$OUT/tests.txt"
# the bench gets what the tests left of the budget, less a minute for the sequence-parallel part
LEFT=$(( BUDGET - SECONDS - 60 ))
"$PY" benchmarks/gpu/bench.py --budget-s "$(( LEFT > 60 ? LEFT : 60 ))" --out "$OUT" || [[ $status -ne 0 ]] || status=1
if (( SECONDS < BUDGET - 30 )); then
  # Sequence parallelism needs two GPUs for SP=2; on one card this measures SP=1's long-row memory
  # and speed alone (a real chitchat dialogue rendered whole, a random 360M-shaped Llama, fp32).
  timeout $(( BUDGET - SECONDS )) "$PY" benchmarks/sequence_parallel.py --ranks 1 --shape 960,2560,32,15,5,64 \
    --lengths 4096,8192 --budget-mib 65536 --results "$OUT/sequence_parallel.json" > "$OUT/sequence_parallel.txt" 2>&1 \
    || [[ $status -ne 0 ]] || status=1
fi
echo "run.sh: ${SECONDS} s"
exit "$status"
