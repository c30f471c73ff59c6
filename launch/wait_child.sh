# shellcheck shell=bash
# Sourced by launch/train.sh and launch/slurm.sbatch: wait_child PID waits for a background child
# whose status matters (75: requeue) while this script's traps pass signals on.
#
# A trapped signal ends `wait` early with 128 + its number, so the wait is made again while the
# child runs. The caller's traps set trapped=1: a wait with no trap during it returned the child's
# own status. After a trap, a child already gone may have ended just then (its status is still to
# collect: wait again) or before (the status is the one returned; a second wait gives the same, or
# 127 in POSIX mode). Sets `status`.
trapped=0
# shellcheck disable=SC2034  # status is read by the caller
wait_child() {
  local again
  while :; do
    trapped=0
    status=0
    wait "$1" || status=$?
    (( trapped )) || return 0
    kill -0 "$1" 2>/dev/null && continue
    again=0
    wait "$1" 2>/dev/null || again=$?
    (( again == 127 )) || status=$again
    return 0
  done
}
