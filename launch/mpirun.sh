#!/usr/bin/env bash
# Run the recipe under MPI: ranks are discovered through mpi4py
# (deepspeed.init_distributed(auto_mpi_discovery=True)).
#
#   NUM_PROCS=2 bash launch/mpirun.sh [RECIPE.yaml] [key=value ...]
#   MPI_ARGS="-f hosts -ppn 4" NUM_PROCS=8 bash launch/mpirun.sh recipes/default.yaml
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export MASTER_PORT="${MASTER_PORT:-29500}"
"$PYTHON" -m resure_ds.data.prepare "${ARGS[@]}" >/dev/null  # recipe check, model and data, before any rank
# shellcheck disable=SC2086
exec mpirun -n "${NUM_PROCS:-2}" ${MPI_ARGS:-} -genv MASTER_PORT "$MASTER_PORT" \
  "$PYTHON" -u -m resure_ds.train "${ARGS[@]}"
