"""resure_ds/node.py, this node's launcher, with ranks that are small bash scripts: what each rank
receives, when the others are ended, and the job's status. (The training ranks under it:
tests/test_faults.py's stop-signal and kill tests.)"""
import os
import signal
import subprocess
import sys
import time

import pytest

from resure_ds import node
from tests.conftest import ROOT

# A rank: notes each signal it gets in $DIR/$RANK, and exits 75 two seconds after SIGTERM or SIGUSR1
# (a checkpoint's save), 130 on SIGINT.
RANK = r"""
trap 'echo TERM >> "$DIR/$RANK"; sleep 2; exit 75' TERM
trap 'echo USR1 >> "$DIR/$RANK"; sleep 2; exit 75' USR1
trap 'echo INT >> "$DIR/$RANK"; exit 130' INT
echo started >> "$DIR/$RANK"
while :; do sleep 0.1; done
"""


def start(tmp_path, rank_script, nproc=2, grace=node.GRACE_S, stop_wait=node.STOP_WAIT_S,
          interrupt_wait=node.INTERRUPT_WAIT_S, prefix=()):
    """The launcher in a process of its own (its signal handlers are the ones under test)."""
    code = (f"import sys; from resure_ds import node; node.GRACE_S = {grace}; node.STOP_WAIT_S = {stop_wait}; "
            f"node.INTERRUPT_WAIT_S = {interrupt_wait}; sys.exit(node.main(sys.argv[1:]))")
    return subprocess.Popen([*prefix, sys.executable, "-c", code, "--nproc", str(nproc), "--master-port", "1",
                             "bash", "-c", rank_script], cwd=ROOT, env={**os.environ, "DIR": str(tmp_path),
                                                                      "PYTHONPATH": ROOT},
                            stderr=subprocess.PIPE, text=True)


def processes_with(marker: str) -> list[int]:
    """Processes whose command line holds marker."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read().replace(b"\0", b" "):
                    found.append(int(pid))
        except OSError:
            pass
    return found


def seen(tmp_path, rank):
    path = tmp_path / str(rank)
    return path.read_text().split() if path.exists() else []


def wait_started(tmp_path, nproc=2, timeout=20):
    deadline = time.monotonic() + timeout
    while not all("started" in seen(tmp_path, r) for r in range(nproc)):
        assert time.monotonic() < deadline, "the ranks did not start"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_reaches_every_rank_once_and_the_job_exits_75(tmp_path, sig):
    """SLURM's pre-emption (SIGTERM) or warning (SIGUSR1) to the launcher, five times in a row: each
    rank is told once and given the time its save takes (DeepSpeed's launcher killed the ranks and
    exited 1)."""
    proc = start(tmp_path, RANK)
    wait_started(tmp_path)
    for _ in range(5):
        proc.send_signal(sig)
        time.sleep(0.1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    name = signal.Signals(sig).name[3:]
    assert seen(tmp_path, 0) == seen(tmp_path, 1) == ["started", name]


def test_the_first_rank_to_fail_gives_the_jobs_status(tmp_path):
    """Rank 1 fails with 3, rank 0 with 1 a few milliseconds later (as peers do once a collective
    breaks): the job's status is 3, the cause, every time."""
    script = 'sleep 1; if [[ $RANK == 1 ]]; then exit 3; fi; sleep 0.02; exit 1'
    codes = []
    for _ in range(4):
        proc = start(tmp_path, script)
        proc.communicate(timeout=30)
        codes.append(proc.returncode)
    assert codes == [3, 3, 3, 3]


def test_a_failed_rank_ends_the_others_and_their_children(tmp_path):
    """Rank 1 fails (status 3); rank 0 ignores SIGTERM (as a rank stuck in a collective with a dead
    peer does) and has a child of its own (a data worker, say): both get SIGTERM, then SIGKILL
    after the grace period; nothing is left; the job's status is 3."""
    script = r"""
trap 'echo TERM >> "$DIR/$RANK"' TERM
echo started >> "$DIR/$RANK"
if [[ $RANK == 1 ]]; then sleep 0.5; exit 3; fi
sleep 3001 &
while :; do sleep 0.1; done
"""
    t0 = time.monotonic()
    proc = start(tmp_path, script, grace=1.0)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert time.monotonic() - t0 < 15
    assert seen(tmp_path, 0) == ["started", "TERM"]
    time.sleep(0.2)
    assert processes_with("sleep 3001") == []


def test_a_rank_that_stops_with_a_checkpoint_waits_for_the_others(tmp_path):
    """Rank 0 exits 75 first; rank 1 takes 3 s more to finish its part and exits 75 too: it is not
    ended early, and the job exits 75. Had it hung, it would be ended after STOP_WAIT_S (here 1 s
    would have; 30 s is given)."""
    script = r"""
echo started >> "$DIR/$RANK"
if [[ $RANK == 1 ]]; then trap 'echo TERM >> "$DIR/$RANK"' TERM; sleep 3; echo done >> "$DIR/$RANK"; fi
exit 75
"""
    proc = start(tmp_path, script, stop_wait=30.0)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert seen(tmp_path, 1) == ["started", "done"]


def test_a_rank_that_hangs_after_a_peer_stopped_is_ended_and_the_job_fails(tmp_path):
    script = r"""
echo started >> "$DIR/$RANK"
if [[ $RANK == 1 ]]; then trap '' TERM; while :; do sleep 0.1; done; fi
exit 75
"""
    proc = start(tmp_path, script, grace=0.5, stop_wait=0.5)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGKILL, err  # not 75: rank 1's part of the save is unknown


def test_a_rank_ended_by_the_launchers_own_sigterm_is_not_counted_as_stopped(tmp_path):
    """After a SIGTERM passed on, rank 0 saves (75) and rank 1 does not (it survives the request but
    dies of the launcher's SIGTERM that ends the ranks, 143 like the request's): the job fails."""
    script = r"""
echo started >> "$DIR/$RANK"
if [[ $RANK == 0 ]]; then trap 'exit 75' TERM; else trap 'trap - TERM' TERM; fi
while :; do sleep 0.1; done
"""
    proc = start(tmp_path, script, grace=5.0, stop_wait=0.5)
    wait_started(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_an_interrupt_to_the_launcher_alone_ends_the_ranks_after_a_wait(tmp_path, sig):
    """A terminal's Ctrl-C or hang-up reaches the ranks itself (they share the launcher's process
    group; nothing is passed on twice). Sent to the launcher alone, the ranks still running after
    INTERRUPT_WAIT_S get SIGTERM: they save and exit 75."""
    proc = start(tmp_path, RANK, interrupt_wait=0.5)
    wait_started(tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    assert seen(tmp_path, 0) == seen(tmp_path, 1) == ["started", "TERM"]


def test_a_second_ctrl_c_kills_the_ranks(tmp_path):
    proc = start(tmp_path, r"""trap '' INT TERM; echo started >> "$DIR/$RANK"; while :; do sleep 0.1; done""")
    wait_started(tmp_path)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGKILL, err


def test_the_ranks_share_the_launchers_process_group(tmp_path):
    """So an outer tool's kill of the group (here `timeout -k`, which ends the group with SIGKILL)
    reaches every rank, and a rank may read the terminal (pdb)."""
    script = r"""trap '' TERM; echo started >> "$DIR/$RANK"; exec sleep 3002"""
    proc = start(tmp_path, script, prefix=("timeout", "-k", "1", "2"))
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL  # timeout ends its own group, itself included
    time.sleep(0.2)
    assert processes_with("sleep 3002") == []


def test_when_the_launcher_is_killed_the_ranks_are_told_to_stop(tmp_path):
    """SIGKILL (or the OOM killer) to the launcher: the kernel sends every rank SIGTERM, which a
    training rank takes as a stop request (a checkpoint, then status 75); none is left running."""
    proc = start(tmp_path, RANK)
    wait_started(tmp_path)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while not all("TERM" in seen(tmp_path, r) for r in (0, 1)):
        assert time.monotonic() < deadline, (seen(tmp_path, 0), seen(tmp_path, 1))
        time.sleep(0.05)


def test_a_rank_forked_after_the_launcher_died_does_not_run(tmp_path):
    """The launcher's own SIGTERM handler is dropped in the child before anything else, so the
    guard for a launcher that died before PR_SET_PDEATHSIG took effect ends the child."""
    code = ("import signal, subprocess, sys; from resure_ds import node; "
            "signal.signal(signal.SIGTERM, lambda *a: None); "
            "p = subprocess.Popen(['true'], preexec_fn=node._rank_setup(parent=1)); sys.exit(p.wait())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 128 + signal.SIGTERM


def test_a_rank_that_cannot_start_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "resure_ds.node", "--nproc", "2", "--master-port", "1",
                          str(tmp_path / "missing.sh")], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert f"[resure_ds] error: rank 0 could not start {tmp_path / 'missing.sh'}: No such file" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("argv, match", [
    (["--nproc", "0", "true"], "--nproc 0: give 1 or more ranks"),
    (["--nproc", "1", "--node-rank", "1", "true"], "--node-rank goes with --hostfile"),
    (["--nproc", "1"], "give the command each rank runs"),
])
def test_bad_arguments_are_one_line(argv, match):
    out = subprocess.run([sys.executable, "-m", "resure_ds.node", "--master-port", "1", *argv], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and match in out.stderr and "Traceback" not in out.stderr


def test_a_command_after_double_dash_runs():
    out = subprocess.run([sys.executable, "-m", "resure_ds.node", "--master-port", "1", "--nproc", "1", "--",
                          "bash", "-c", "exit 7"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 7, out.stderr


def test_ranks_are_numbered_from_the_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=2 max_slots=4\n\nnode-b   slots=3  # the second\n")
    hosts = node.read_hostfile(str(hostfile))
    assert hosts == [("node-a", 2), ("node-b", 3)]
    envs = node.rank_envs(hosts, 1, "10.0.0.1", 29500)
    assert [(e["RANK"], e["LOCAL_RANK"]) for e in envs] == [("2", "0"), ("3", "1"), ("4", "2")]
    assert {(e["WORLD_SIZE"], e["LOCAL_SIZE"], e["LOCAL_WORLD_SIZE"], e["CROSS_RANK"], e["CROSS_SIZE"],
             e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("5", "3", "3", "1", "2", "10.0.0.1", "29500")}


@pytest.mark.parametrize("text, match", [
    ("node-a slots=0\n", "line 1: 'node-a slots=0': write `HOSTNAME slots=N` with N >= 1"),
    ("node-a\n", "line 1: 'node-a'"),
    ("node-a slots=1\nnode-a slots=2\n", "line 2: host node-a is listed twice"),
    ("# nothing\n", "lists no host"),
    (b"n\xe9ud slots=1\n", "is not UTF-8 text"),
])
def test_a_bad_hostfile_is_one_line_naming_it(tmp_path, text, match):
    hostfile = tmp_path / "hostfile"
    hostfile.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(node.LaunchError, match=match.replace("(", r"\(").replace("`", "`")) as e:
        node.read_hostfile(str(hostfile))
    assert str(hostfile) in str(e.value)
    with pytest.raises(node.LaunchError, match="NODE_RANK=2: the hostfile lists 1 node"):
        node.rank_envs([("a", 1)], 2, "x", 1)


def test_a_rank_ended_by_the_stop_signal_while_starting_counts_as_stopped(tmp_path):
    """A rank that had not yet installed its handler (Python still importing) dies of the SIGTERM
    passed on: it had saved nothing since the last checkpoint, so the job is to be run again (75)."""
    script = r"""
echo started >> "$DIR/$RANK"
if [[ $RANK == 1 ]]; then trap 'sleep 1; exit 75' TERM; fi
while :; do sleep 0.1; done
"""
    proc = start(tmp_path, script)
    wait_started(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err


def test_a_stop_marked_before_the_launcher_started_is_not_lost(tmp_path):
    """RESURE_STOP_FILE (launch/slurm.sbatch makes it before it signals): a stop that came while
    the launcher started, its signals still ignored, is found once its handlers are in place. One
    node: 75 with no rank started; without the file the ranks start as usual."""
    code = "import sys; from resure_ds import node; sys.exit(node.main(sys.argv[1:]))"
    marker = tmp_path / "status-1.stop"
    marker.touch()
    run = [sys.executable, "-c", code, "--nproc", "2", "--master-port", "1", "bash", "-c",
           'echo started >> "$DIR/$RANK"']
    env = {**os.environ, "DIR": str(tmp_path), "PYTHONPATH": ROOT, "RESURE_STOP_FILE": str(marker)}
    out = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 75, out.stderr
    assert "a stop was asked for as the launcher started: no rank started" in out.stderr
    assert seen(tmp_path, 0) == seen(tmp_path, 1) == []
    marker.unlink()
    out = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert seen(tmp_path, 0) == seen(tmp_path, 1) == ["started"]


def test_on_several_nodes_a_marked_stop_is_left_to_the_ranks(tmp_path):
    """With a hostfile the other nodes' ranks are starting and would wait for this node's: the ranks
    start, and nothing is passed to them (a signal in their first milliseconds would kill them); they
    find the file themselves (tests/test_stop.py: every rank ends together after the rendezvous)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\nother slots=2\n")
    marker = tmp_path / "status-1.stop"
    marker.touch()
    code = "import sys; from resure_ds import node; sys.exit(node.main(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", code, "--hostfile", str(hostfile), "--node-rank", "0",
                          "--master-port", "1", "bash", "-c", RANK.replace("while :; do sleep 0.1; done", "exit 0")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DIR": str(tmp_path), "PYTHONPATH": ROOT, "RESURE_STOP_FILE": str(marker)})
    assert out.returncode == 0, out.stderr
    assert seen(tmp_path, 0) == seen(tmp_path, 1) == ["started"]
