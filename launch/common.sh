# shellcheck shell=bash
# Sourced by the launch scripts: repository root, interpreter, import path,
# and the recipe argument (recipes/default.yaml unless the first argument is
# a .yaml/.yml file). Sets ROOT, PYTHON and the array ARGS.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
ARGS=("$@")
if [[ ${#ARGS[@]} -eq 0 || "${ARGS[0]}" != *.y*ml ]]; then
  ARGS=("$ROOT/recipes/default.yaml" "${ARGS[@]}")
fi
