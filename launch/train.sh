#!/usr/bin/env bash
""":"
# Run the ReSURE recipe.
#
#   bash launch/train.sh [RECIPE.yaml] [key=value ...]
#
# Run directly, it starts this node's ranks (resure_ds/node.py), each
# running this same script; with LAUNCHER_ARGS, or a HOSTFILE without
# NODE_RANK, DeepSpeed's runner starts them (--no_python). Started by a
# launcher (RANK or LOCAL_RANK set), it runs the recipe for that rank.
# Under the deepspeed launcher, every form works:
#   deepspeed launch/train.sh recipes/default.yaml
#   deepspeed --num_gpus 2 --no_python launch/train.sh recipes/default.yaml
#   deepspeed --no_python --no_local_rank launch/train.sh recipes/default.yaml
# The file is valid bash and valid Python: handed to Python (deepspeed's
# default), it runs itself again under bash. The launcher's --local_rank
# is dropped either way: the rank comes from LOCAL_RANK.
#
# Environment:
#   NUM_PROCS     ranks per node (default: visible GPUs, or 2 on a CPU machine)
#   HOSTFILE      DeepSpeed hostfile for multi-node runs (default: none)
#   NODE_RANK     with HOSTFILE: run one launcher per node yourself (e.g. under
#                 srun --ntasks-per-node=1, NODE_RANK=$SLURM_NODEID), each starting
#                 only its node's ranks, no ssh; then MASTER_ADDR and MASTER_PORT
#                 must be set, the same on every node
#   MASTER_ADDR / MASTER_PORT   rendezvous (default: launcher's / a free port)
#   PYTHON        interpreter (default: python3)
#   LAUNCHER_ARGS extra deepspeed launcher flags
#   RESURE_STOP_FILE  (set by launch/slurm.sbatch) a file made when a stop is asked for: seen
#                 where a signal cannot be caught, as the ranks' launcher starts
set -euo pipefail
resure_stop=0  # a stop (TERM/USR1) asked for before the ranks start: noted from the first line (below)
[[ -n "${RANK:-}" || -n "${LOCAL_RANK:-}" ]] || trap 'resure_stop=1' TERM USR1
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ -n "${RANK:-}" || -n "${LOCAL_RANK:-}" ]]; then
  # One rank, started by a launcher. On CPU, ranks share the cores.
  if [[ -z "${OMP_NUM_THREADS:-}" && -n "${LOCAL_SIZE:-${LOCAL_WORLD_SIZE:-}}" ]]; then
    export OMP_NUM_THREADS=$(( $(nproc) / ${LOCAL_SIZE:-${LOCAL_WORLD_SIZE}} > 0 ? $(nproc) / ${LOCAL_SIZE:-${LOCAL_WORLD_SIZE}} : 1 ))
  fi
  if [[ "${CROSS_SIZE:-1}" != 1 ]]; then
    # Several nodes: until resure_ds/train.py records stops (its first line), one would kill this rank
    # and leave the other nodes' ranks waiting at the rendezvous: ignored instead (until replaced);
    # under slurm.sbatch the rank still finds it (RESURE_STOP_FILE).
    trap '' TERM USR1
  fi
  exec "$PYTHON" -u -m resure_ds.train "${ARGS[@]}"
fi

# A stop asked for before the ranks start (SIGTERM/SIGUSR1, e.g. passed on by srun or slurm.sbatch)
# ends the job once the step under way (prepare, scoring) is done, before any rank starts: status 75,
# run again to continue. (The trap is set on the first line.)
# One node of several (NODE_RANK) with its data ready hands the stop to its ranks instead: another
# node may have started its ranks already, and they would wait for this node's at the rendezvous;
# right after it every rank ends together (resure_ds/train.py reads RESURE_STOP_FILE).
stopped() {  # $1: the status of the step under way (3: scoring still to do); after a stop, 75
  if (( ! resure_stop )) && [[ -n "${RESURE_STOP_FILE:-}" && -e "$RESURE_STOP_FILE" ]]; then
    resure_stop=1  # slurm.sbatch's
  fi
  if (( resure_stop )) && [[ $1 == 0 || $1 == 3 || $1 == 143 || $1 == 138 ]]; then
    if [[ $1 == 0 && -n "${NODE_RANK:-}" ]]; then
      if [[ -z "${RESURE_STOP_FILE:-}" ]]; then
        RESURE_STOP_FILE=$(mktemp "${TMPDIR:-/tmp}/resure-stop.XXXXXX")
        export RESURE_STOP_FILE
      fi
      : > "$RESURE_STOP_FILE"
      if (( resure_stop < 2 )); then
        echo "[resure_ds] a stop was asked for while preparing: this node's ranks start, and stop with the" \
          "other nodes' after their rendezvous" >&2
      fi
      resure_stop=2
      return 0
    fi
    echo "[resure_ds] a stop was asked for while preparing: no rank started; run again to continue" >&2
    exit 75
  fi
}

gpu=0  # a GPU driver's tools or device files: ask torch; none of them: a CPU machine (no torch import)
if command -v nvidia-smi >/dev/null 2>&1 || command -v rocm-smi >/dev/null 2>&1 || command -v amd-smi >/dev/null 2>&1 \
   || [[ -e /dev/nvidiactl || -e /proc/driver/nvidia || -e /dev/kfd ]]; then
  gpu=1
fi
if [[ -n "${HOSTFILE:-}" ]]; then
  NUM_PROCS="${NUM_PROCS:-1}"  # the hostfile's slots decide
elif [[ -z "${NUM_PROCS:-}" ]]; then
  if (( gpu )); then
    NUM_PROCS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
  else
    NUM_PROCS=2
  fi
fi
if ! [[ "$NUM_PROCS" =~ ^[1-9][0-9]{0,3}$ ]]; then
  echo "[resure_ds] error: NUM_PROCS=$NUM_PROCS: give the number of ranks per node, 1 to 9999" >&2
  exit 2
fi
if [[ -n "${NODE_RANK:-}" ]] && ! [[ "$NODE_RANK" =~ ^[0-9]{1,4}$ ]]; then
  echo "[resure_ds] error: NODE_RANK=$NODE_RANK: give this node's line in HOSTFILE, from 0" >&2
  exit 2
fi
if [[ -n "${NODE_RANK:-}" && -z "${MASTER_PORT:-}" ]]; then
  echo "[resure_ds] error: NODE_RANK is set: set MASTER_PORT, the same on every node" >&2
  exit 2
fi
if [[ -n "${NODE_RANK:-}" && -n "${HOSTFILE:-}" && -z "${MASTER_ADDR:-}" ]]; then
  echo "[resure_ds] error: NODE_RANK is set: set MASTER_ADDR (the first node), the same on every node" >&2
  exit 2
fi
MASTER_PORT="${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}"
LAUNCHER_ARGS="${LAUNCHER_ARGS:-}"
own=0
if [[ -z "${LAUNCHER_ARGS//[[:space:]]/}" && ( -z "${HOSTFILE:-}" || -n "${NODE_RANK:-}" ) ]]; then
  # This node's ranks started here (one machine, or this node of a hostfile), by resure_ds/node.py:
  # it passes SIGTERM/SIGUSR1 on and waits for the ranks' checkpoint and status 75, where
  # DeepSpeed's per-node launcher kills them within 30 s and exits 1 (a pre-empted job would not
  # resume). Ranks inherit CUDA_VISIBLE_DEVICES and take device LOCAL_RANK among those.
  # With launcher flags, or several nodes over ssh: DeepSpeed's runner.
  own=1
  launcher=("$PYTHON" -u -m resure_ds.node --master-port "$MASTER_PORT")
  if [[ -n "${HOSTFILE:-}" ]]; then
    launcher+=(--hostfile "$HOSTFILE" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR")
  else
    launcher+=(--nproc "$NUM_PROCS")
  fi
else
  launcher=(deepspeed --no_python --no_local_rank --master_port "$MASTER_PORT")
  if [[ -n "${HOSTFILE:-}" ]]; then
    launcher+=(--hostfile "$HOSTFILE")
    [[ -n "${MASTER_ADDR:-}" ]] && launcher+=(--master_addr "$MASTER_ADDR")
    if [[ -n "${NODE_RANK:-}" ]]; then
      launcher+=(--no_ssh --node_rank "$NODE_RANK")
    fi
  else
    launcher+=(--num_gpus "$NUM_PROCS")
  fi
  # shellcheck disable=SC2206
  launcher+=(${LAUNCHER_ARGS:-})
fi
# Before any rank starts: check the recipe, convert the embedded model once, and prepare the
# data (a cache hit when unchanged). Bad config or data stops here, with one clear error.
# With stats.reference, sources without reference losses are scored once (status 3 says so).
# (A step ended by the stop signal itself resumes from its finished units when run again.)
status=0
"$PYTHON" -m resure_ds.data.prepare --check-reference "${ARGS[@]}" >/dev/null || status=$?
stopped "$status"
if [[ $status == 3 ]]; then
  status=0
  "$PYTHON" -m resure_ds.eval.score "${ARGS[@]}" >/dev/null || status=$?
  stopped "$status"
fi
if [[ $status != 0 ]]; then
  exit "$status"
fi
if (( own )); then
  # From here until resure_ds/node.py has its handlers (tens of ms while its Python starts), a
  # stop would end the launcher unseen (138/143, a failed job): it is ignored instead (ignored stays
  # ignored across exec, until node.py's handlers replace it), and one that came before is kept.
  # Under slurm.sbatch, an ignored one is not lost: node.py (one node) or the ranks (several) look
  # for RESURE_STOP_FILE once their handlers are in place.
  trap '' TERM USR1
  stopped 0
fi
exec "${launcher[@]}" "$0" "${ARGS[@]}"
# Python reads everything above as one string and runs what follows: this file again, under bash.
: <<'END_OF_PYTHON'
"""
import os, sys  # noqa: E401,E402

args = [a for i, a in enumerate(sys.argv[1:], 1)
        if not a.startswith(("--local_rank", "--local-rank")) and sys.argv[i - 1] not in ("--local_rank", "--local-rank")]
os.environ.setdefault("PYTHON", sys.executable)  # the interpreter the launcher chose, not whatever python3 is
os.execvp("bash", ["bash", os.path.abspath(__file__), *args])
END_OF_PYTHON
