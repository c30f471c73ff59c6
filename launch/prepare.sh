#!/usr/bin/env bash
# Prepare the training data once: validate, render and tokenize into token shards.
#
#   bash launch/prepare.sh [RECIPE.yaml] [key=value ...]       # this machine, data.prepare_workers processes
#
# On a cluster, one task per node over a shared filesystem, each taking its
# share of the input units (task 0 writes the manifest when all are done):
#   srun --nodes 4 --ntasks-per-node 1 bash launch/prepare.sh recipes/default.yaml \
#       data.train=/shared/raw/ data.prepared_dir=/shared/prepared
#   mpirun -n 4 -ppn 1 bash launch/prepare.sh recipes/default.yaml ...
# Tasks come from SLURM_PROCID/SLURM_NTASKS, OMPI_COMM_WORLD_*, PMI_* or RANK/WORLD_SIZE.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
exec "$PYTHON" -m resure_ds.data.prepare --tasks-from-env "${ARGS[@]}"
