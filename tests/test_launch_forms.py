"""launch/train.sh under every form of the deepspeed launcher, and one run per run folder."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from resure_ds.runtime.run_folder import RunFolderBusy, RunLock
from tests.conftest import ROOT
from tests.e2e_common import COMMON, assert_same_training, env, metrics
from tests.test_faults import rank_pid

TRAIN = os.path.join(ROOT, "launch", "train.sh")


def port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_the_launchers_local_rank_is_dropped_in_every_form():
    """Handed to bash with --local_rank=N first (deepspeed --no_python), or to Python (deepspeed's
    default), the script reaches the recipe with the recipe first and no --local_rank."""
    out = subprocess.run(["bash", "-c", 'source launch/common.sh "$@"; printf "[%s]\\n" "${ARGS[@]}"', "_",
                          "--local_rank=1", "recipes/sft.yaml", "--local_rank", "0", "a=b"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == ["[recipes/sft.yaml]", "[a=b]"]
    for runner in ([sys.executable], ["bash"]):  # the whole chain to the recipe, which refuses a bad value
        out = subprocess.run([*runner, TRAIN, "--local_rank=0", "recipes/sft.yaml", "train.max_steps=0"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120,
                             env={**env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        assert out.returncode == 2 and "in recipes/sft.yaml:\n  train.max_steps: must be > 0" in out.stderr, out.stderr


def test_a_rank_count_that_is_not_a_positive_integer_is_one_line():
    for bad in ("0", "abc", "-1", "2 3", "18446744073709551616"):  # the last wrapped to -1 in bash arithmetic
        out = subprocess.run(["bash", TRAIN, "recipes/sft.yaml"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, env={**env(), "NUM_PROCS": bad})
        assert out.returncode == 2 and out.stderr == (f"[resure_ds] error: NUM_PROCS={bad}: give the number of "
                                                      "ranks per node, 1 to 9999\n"), out.stderr


def test_a_held_lock_is_refused_naming_its_holder_and_a_dead_ones_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from resure_ds.runtime.run_folder import RunLock; RunLock(sys.argv[2]).acquire(); "
                               "print('held', flush=True); time.sleep(60)", ROOT, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"is in use by another run \\(pid {holder.pid} on "):
            RunLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(str(tmp_path))
    lock.acquire()  # the holder died: its lock went with it, its note stays
    assert lock.previous["pid"] == holder.pid
    lock.release()
    again = RunLock(str(tmp_path))
    again.acquire()
    assert again.previous is None  # a run that ended by itself leaves no note
    again.release()


@pytest.mark.slow
def test_deepspeed_forms_and_one_run_per_folder(straight, tiny_model_path):
    """`deepspeed launch/train.sh recipes/default.yaml ...` (Python handed the script) on 2 ranks trains like
    the straight run. While it holds its folder (its rank 0 paused by SIGSTOP once the lock is taken), the
    same command through bash launch/train.sh into that folder stops with one line naming it. Then the
    same deepspeed form on 1 rank continues the run."""
    out = os.path.dirname(straight)
    args = ["recipes/default.yaml", f"model.path={tiny_model_path}", *COMMON, f"output.dir={out}",
            "output.name=shared"]
    first = subprocess.Popen(["deepspeed", "--num_gpus", "2", "--master_port", port(), TRAIN, *args], cwd=ROOT,
                             env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = os.path.join(out, "shared", ".lock")
    deadline = time.monotonic() + 300
    while not (os.path.exists(lock) and open(lock, encoding="utf-8").read().strip()):
        assert first.poll() is None and time.monotonic() < deadline, "the first run ended before taking its folder"
        time.sleep(0.05)
    holder = rank_pid(0, "output.name=shared")
    os.kill(holder, signal.SIGSTOP)
    try:
        second = subprocess.run(["bash", TRAIN, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                                timeout=600)
    finally:
        os.kill(holder, signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-4000:]
    assert second.returncode == 2, second.stderr[-3000:]
    refusal = [ln for ln in second.stderr.splitlines() if "[resure_ds] error" in ln]
    assert len(refusal) == 1 and f"is in use by another run (pid {holder} on " in refusal[0], second.stderr[-3000:]
    with open(lock, encoding="utf-8") as f:
        assert f.read() == ""  # released by the run that ended by itself
    assert_same_training(straight, os.path.join(out, "shared"))
    resumed = subprocess.run(["deepspeed", "--num_gpus", "1", "--master_port", port(), TRAIN, *args,
                              "train.max_steps=8", "train.micro_batch_size=4"], cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "saved on 2 rank(s), now 1" in resumed.stderr and "took over" not in resumed.stderr
    assert [r["step"] for r in metrics(os.path.join(out, "shared"))] == list(range(1, 9))


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    """ENOLCK (NFSv3 without its lock service) is not 'in use by another run': the run goes on, warned."""
    import errno
    import fcntl

    def no_locks(*a):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert "cannot be locked (No locks available)" in capsys.readouterr().err
    lock.release()
