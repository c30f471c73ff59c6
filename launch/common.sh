# shellcheck shell=bash
# Sourced by the launch scripts: repository root, interpreter, import path,
# and the recipe argument (recipes/default.yaml unless the first argument is
# a .yaml/.yml file). Sets ROOT, PYTHON and the array ARGS (without a
# launcher's --local_rank).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
ARGS=()
skip=0
for a in "$@"; do  # a launcher's --local_rank=N (or --local_rank N): the rank comes from LOCAL_RANK
  if (( skip )); then skip=0; continue; fi
  case "$a" in
    --local_rank=*|--local-rank=*) ;;
    --local_rank|--local-rank) skip=1 ;;
    *) ARGS+=("$a") ;;
  esac
done
if [[ ${#ARGS[@]} -eq 0 || "${ARGS[0]}" != *.y*ml ]]; then
  ARGS=("$ROOT/recipes/default.yaml" "${ARGS[@]}")
fi
