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


@pytest.mark.parametrize("gpu, extra, expect", [
    (False, {}, "-m resure_ds.node --master-port 5 --nproc 2 "),
    (False, {"LAUNCHER_ARGS": "  "}, "-m resure_ds.node --master-port 5 --nproc 2 "),
    (False, {"LAUNCHER_ARGS": "--bind_cores_to_rank"}, "deepspeed --no_python --no_local_rank --master_port 5 --num_gpus 2 --bind_cores_to_rank "),
    (False, {"HOSTFILE": "H"}, "deepspeed --no_python --no_local_rank --master_port 5 --hostfile H "),
    (False, {"HOSTFILE": "H", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"},
     "-m resure_ds.node --master-port 5 --hostfile H --node-rank 1 --master-addr 10.0.0.1 "),
    # SLURM sets CUDA_VISIBLE_DEVICES for --gres=gpu: the ranks take LOCAL_RANK among those
    (True, {"CUDA_VISIBLE_DEVICES": "2,3"}, "-m resure_ds.node --master-port 5 --nproc 2 "),
    (True, {"CUDA_VISIBLE_DEVICES": "0,1", "HOSTFILE": "H", "NODE_RANK": "0", "MASTER_ADDR": "n0"},
     "-m resure_ds.node --master-port 5 --hostfile H --node-rank 0 --master-addr n0 "),
])
def test_which_launcher_starts_the_ranks(tmp_path, gpu, extra, expect):
    """resure_ds/node.py (stop signals passed on, status 75 kept) wherever train.sh starts a node's
    ranks itself; DeepSpeed's runner for launcher flags and ssh. PYTHON and deepspeed are stand-ins
    that print the command they were given."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "py").write_text('#!/bin/bash\ncase "$*" in *data.prepare*) exit 0;; *cuda.device_count*) echo 2;; '
                             '*) echo "RUN $*";; esac\n')
    (bin_ / "deepspeed").write_text('#!/bin/bash\necho "RUN deepspeed $*"\n')
    if gpu:
        (bin_ / "nvidia-smi").write_text("#!/bin/bash\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    out = subprocess.run(["bash", TRAIN, "recipes/sft.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"HOME": str(tmp_path), "PATH": f"{bin_}:/usr/bin:/bin", "PYTHON": str(bin_ / "py"),
                              "MASTER_PORT": "5", **({} if gpu else {"NUM_PROCS": "2"}), **extra})
    assert out.returncode == 0, out.stderr
    assert expect + f"{TRAIN} recipes/sft.yaml" in out.stdout.replace("RUN ", ""), out.stdout


@pytest.mark.parametrize("prepare_dies", [False, True])
def test_a_stop_asked_for_while_preparing_starts_no_rank_and_exits_75(tmp_path, prepare_dies):
    """SIGUSR1 (srun passes slurm.sbatch's warning to each node's script) or SIGTERM (pre-emption,
    which reaches prepare too) while prepare runs: no launcher starts, status 75."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "py").write_text(f'#!/bin/bash\ncase "$*" in *data.prepare*) trap "exit 143" TERM; echo $$ > {tmp_path}/p; '
                             f'mv {tmp_path}/p {tmp_path}/preparing; sleep 2 & wait; exit 0;; *) echo "RUN $*";; esac\n')
    (bin_ / "py").chmod(0o755)
    proc = subprocess.Popen(["bash", TRAIN, "recipes/sft.yaml"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={"HOME": str(tmp_path), "PATH": f"{bin_}:/usr/bin:/bin",
                                            "PYTHON": str(bin_ / "py"), "MASTER_PORT": "5", "NUM_PROCS": "2"})
    deadline = time.monotonic() + 30
    while not (tmp_path / "preparing").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    if prepare_dies:  # pre-emption: SIGTERM to every process of the job, prepare included
        proc.send_signal(signal.SIGTERM)
        os.kill(int((tmp_path / "preparing").read_text()), signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    assert "a stop was asked for while preparing: no rank started" in err and "RUN" not in out


def test_a_stop_as_the_launcher_starts_does_not_kill_the_job(tmp_path):
    """SIGUSR1 just as launch/train.sh hands over to resure_ds/node.py (the stand-in PYTHON marks the
    moment, then starts the real launcher, whose Python takes tens of milliseconds to install its
    handlers): ignored until they are in place, so the job is not ended by it (it was, with the
    signal's status, on the first try); once they are, the ranks (bash stand-ins) are told (75)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "py").write_text(
        "#!/bin/bash\n"
        'case "$*" in\n'
        "  *data.prepare*) exit 0;;\n"
        f'  *resure_ds.node*) touch {tmp_path}/launching; exec {sys.executable} "$@";;\n'
        '  *resure_ds.train*) trap "exit 75" USR1; sleep 0.3 & wait; exit 0;;\n'
        "esac\n")
    (bin_ / "py").chmod(0o755)
    seen = set()
    for delay in (0, 0, 0, 0.2):
        proc = subprocess.Popen(["bash", TRAIN, "recipes/sft.yaml"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={"HOME": str(tmp_path), "PATH": f"{bin_}:/usr/bin:/bin", "PYTHON": str(bin_ / "py"),
                                     "PYTHONPATH": ROOT, "MASTER_PORT": "5", "NUM_PROCS": "2"})
        deadline = time.monotonic() + 30
        while not (tmp_path / "launching").exists():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        (tmp_path / "launching").unlink()
        time.sleep(delay)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, 75), (delay, proc.returncode, err)
        seen.add((delay, proc.returncode))
    assert (0.2, 75) in seen  # the handlers in place: the stop reaches the ranks


def sbatch_stand_ins(tmp_path, nodes: str) -> tuple:
    """scontrol (the node list; requeues logged) and srun (tests/test_e2e.FAKE_SRUN) stand-ins."""
    from tests.test_e2e import FAKE_SRUN

    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    calls = tmp_path / "scontrol.log"
    (bin_ / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\n'
                                   f'[[ "$1" == show ]] && printf "{nodes}"\nexit 0\n')
    (bin_ / "srun").write_text(FAKE_SRUN)
    for f in bin_.iterdir():
        f.chmod(0o755)
    return bin_, calls


def stand_in(bin_, name: str, script: str) -> None:
    """An executable bash script `name` in bin_ (first on the PATH of the command under test)."""
    (bin_ / name).write_text(f"#!/bin/bash\n{script}")
    (bin_ / name).chmod(0o755)


def slow(bin_, tool: str, marker, seconds: float = 1.0) -> None:
    """A stand-in for /usr/bin/<tool> that marks its start and takes `seconds` more: a window made wide."""
    stand_in(bin_, tool, f"touch {marker}\nsleep {seconds}\nexec /usr/bin/{tool} \"$@\"\n")


def repo_sbatch(tmp_path, bin_, job: str) -> subprocess.Popen:
    """launch/slurm.sbatch of this repository on one node, with its launch/train.sh and bin_'s py
    as PYTHON (a stand-in that prepares and launches nothing)."""
    return subprocess.Popen(["/bin/bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "recipes/sft.yaml"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"HOME": str(tmp_path), "PATH": f"{bin_}:/usr/bin:/bin", "PYTHON": str(bin_ / "py"),
                                 "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": job, "GPUS_PER_NODE": "2"})


def test_a_node_that_fails_is_not_hidden_by_another_nodes_75(tmp_path):
    """srun's status is the highest task status, so node 0's 75 would outrank node 1's 3 and the
    job would be requeued: the script reads each node's own status. (launch/train.sh here is a
    stand-in in a submit folder of its own.)"""
    bin_, calls = sbatch_stand_ins(tmp_path, "node0\\nnode1\\n")
    submit = tmp_path / "submit"
    (submit / "launch").mkdir(parents=True)
    (submit / "launch" / "train.sh").write_text('[[ $NODE_RANK == 1 ]] && exit 3\nexit 75\n')
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60,
                         env={**env(), "PATH": f"{bin_}:{env()['PATH']}", "SLURM_JOB_NODELIST": "node[0-1]",
                              "SLURM_JOB_ID": "44", "SLURM_SUBMIT_DIR": str(submit)})
    assert out.returncode == 3, out.stderr
    assert "node 1 (node1) ended with status 3: the job failed, not requeued" in out.stderr
    assert "requeue" not in calls.read_text()


def warn_when(proc: subprocess.Popen, marker) -> tuple[str, str]:
    """SIGUSR1 (SLURM's warning) to the batch script once `marker` exists; its output once it ended."""
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    return proc.communicate(timeout=30)


@pytest.mark.parametrize("on_warning, expect", [("exit 75", 75), ("exit 3", 3)])
def test_one_node_status_is_the_one_its_train_sh_wrote(tmp_path, on_warning, expect):
    """One node: launch/train.sh (a stand-in in a submit folder of its own) runs under a shell that
    writes its status once it ended, and the job's status is that one (bash's wait can return the
    warning's 138 for a child that has just exited); the warning reaches train.sh through that shell."""
    bin_, calls = sbatch_stand_ins(tmp_path, "localhost\\n")
    submit = tmp_path / "submit"
    (submit / "launch").mkdir(parents=True)
    (submit / "launch" / "train.sh").write_text(f'trap "{on_warning}" USR1\ntouch {tmp_path}/started\n'
                                                "sleep 30 >/dev/null 2>&1 & wait\nexit 0\n")
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "slurm.sbatch")], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env(), "PATH": f"{bin_}:{env()['PATH']}", "SLURM_JOB_NODELIST": "node0",
                                 "SLURM_JOB_ID": "46", "SLURM_SUBMIT_DIR": str(submit)})
    out, err = warn_when(proc, tmp_path / "started")
    assert proc.returncode == expect, err
    assert (submit / "runs" / "status-46.0").read_text().strip() == str(expect)
    assert ("requeue 46" in calls.read_text()) == (expect == 75)


def test_the_warning_during_prepare_on_one_node_stops_and_requeues(tmp_path):
    """SIGUSR1 to the batch script while launch/train.sh still prepares (no rank yet): it reaches
    train.sh, which starts no rank and exits 75; the job requeues itself."""
    bin_, calls = sbatch_stand_ins(tmp_path, "localhost\\n")
    stand_in(bin_, "py", f'case "$*" in *data.prepare*) touch {tmp_path}/preparing; sleep 2; exit 0;; '
                         '*) echo "RUN $*";; esac\n')
    proc = repo_sbatch(tmp_path, bin_, "45")
    out, err = warn_when(proc, tmp_path / "preparing")
    assert proc.returncode == 75, err
    assert "no rank started" in err and "RUN" not in out and "requeue 45" in calls.read_text()


def submit_folder(tmp_path, train_sh: str):
    submit = tmp_path / "submit"
    (submit / "launch").mkdir(parents=True)
    (submit / "launch" / "train.sh").write_text(train_sh)
    return submit


def sbatch(tmp_path, bin_, submit, **extra) -> subprocess.Popen:
    return subprocess.Popen(["bash", os.path.join(ROOT, "launch", "slurm.sbatch")], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env(), "PATH": f"{bin_}:{env()['PATH']}", "SLURM_SUBMIT_DIR": str(submit),
                                 **extra})


def test_a_stop_before_the_batch_script_started_any_node_requeues(tmp_path):
    """SIGUSR1 while the batch script still reads its node list (scontrol made slow): it was the
    default action then (138, a failed job); now no node starts, status 75, the job requeues."""
    bin_, calls = sbatch_stand_ins(tmp_path, "node0\\n")
    (bin_ / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\n'
                                   f'[[ "$1" == show ]] && {{ touch {tmp_path}/listing; sleep 1; printf "node0\\n"; }}\n'
                                   "exit 0\n")
    submit = submit_folder(tmp_path, f"touch {tmp_path}/ran\nexit 0\n")
    proc = sbatch(tmp_path, bin_, submit, SLURM_JOB_NODELIST="node0", SLURM_JOB_ID="61")
    out, err = warn_when(proc, tmp_path / "listing")
    assert proc.returncode == 75, err
    assert "a stop was asked for before any node started" in err and "requeue 61" in calls.read_text()
    assert not (tmp_path / "ran").exists()


def test_a_stop_as_train_sh_starts_is_not_its_death(tmp_path):
    """SIGUSR1 to launch/train.sh while it is still sourcing common.sh (dirname made slow): the trap
    is the first thing it sets, so it stops before any rank with 75 (it died with 138)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    slow(bin_, "dirname", tmp_path / "starting")
    stand_in(bin_, "py", 'echo "RUN $*"\n')
    proc = subprocess.Popen(["bash", TRAIN, "recipes/sft.yaml"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={"HOME": str(tmp_path), "PATH": f"{bin_}:/usr/bin:/bin",
                                            "PYTHON": str(bin_ / "py"), "MASTER_PORT": "5", "NUM_PROCS": "2"})
    out, err = warn_when(proc, tmp_path / "starting")
    assert proc.returncode == 75, err
    assert "no rank started" in err and "RUN" not in out


def test_the_status_of_a_node_that_ends_during_the_warnings_forwarding_is_kept(tmp_path):
    """Several nodes under DeepSpeed's runner (LAUNCHER_ARGS; its launch/train.sh runs on the batch
    node). The warning reaches the rank (a bash stand-in) at once and it exits 75 while the batch
    script is still forwarding it (pgrep made slow): bash's wait then gave the trap's 138, or -1
    when waited for again (1 in about 10), and the job was not requeued; now the status that
    launch/train.sh's shell wrote decides, as on one node."""
    bin_, calls = sbatch_stand_ins(tmp_path, "node0\\nnode1\\n")
    slow(bin_, "pgrep", tmp_path / "pgrep-started", 0.5)
    submit = submit_folder(tmp_path, f"bash -c 'trap \"exit 75\" USR1; echo $$ > {tmp_path}/r; mv {tmp_path}/r "
                                     f"{tmp_path}/rank; sleep 30 >/dev/null 2>&1 & wait' resure_ds.train\nexit $?\n")
    proc = sbatch(tmp_path, bin_, submit, SLURM_JOB_NODELIST="node[0-1]", SLURM_JOB_ID="62",
                  LAUNCHER_ARGS="--launcher pdsh")
    deadline = time.monotonic() + 30
    while not (tmp_path / "rank").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    os.kill(int((tmp_path / "rank").read_text()), signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert (tmp_path / "pgrep-started").exists()  # the forwarding ran while the rank ended
    assert proc.returncode == 75, err
    assert "requeue 62" in calls.read_text()


@pytest.mark.parametrize("listed, nodelist, extra, expect", [
    ("\\nnode0\\n \\n", "node0", {}, "H= N= R= L= P=3 A=\n"),  # blank lines in the node list are no node
    ("node0\\nnode1\\n", "node[0-1]", {"LAUNCHER_ARGS": "--launcher pdsh"}, None),
])
def test_a_rank_or_node_left_in_the_environment_is_not_used(tmp_path, listed, nodelist, extra, expect):
    """sbatch passes the submitting shell's environment on: a HOSTFILE left there made one node's
    train.sh start DeepSpeed's runner over ssh to that file's hosts; a NODE_RANK, under DeepSpeed's
    runner on several nodes, put node 0's ranks on another node's line (the job hung); RANK or
    LOCAL_RANK would put train.sh in rank mode."""
    bin_, _ = sbatch_stand_ins(tmp_path, listed)
    submit = submit_folder(tmp_path, f'echo "H=${{HOSTFILE:-}} N=${{NODE_RANK:-}} R=${{RANK:-}} L=${{LOCAL_RANK:-}} '
                                     f'P=${{NUM_PROCS:-}} A=${{LAUNCHER_ARGS:-}}" > {tmp_path}/seen\n')
    proc = sbatch(tmp_path, bin_, submit, SLURM_JOB_NODELIST=nodelist, SLURM_JOB_ID="63", GPUS_PER_NODE="3",
                  HOSTFILE=str(tmp_path / "stale-hostfile"), NODE_RANK="1", RANK="5", LOCAL_RANK="1", **extra)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    hostfile = str(tmp_path / "stale-hostfile")  # several nodes: the path the job writes its hostfile to
    assert (tmp_path / "seen").read_text() == (expect or f"H={hostfile} N= R= L= P=2 A=--launcher pdsh\n")
    assert "RANK/LOCAL_RANK/NODE_RANK (and on one node HOSTFILE) from the environment are not used" in err


def test_a_sigterm_to_the_whole_job_while_it_lists_its_nodes_requeues(tmp_path):
    """Pre-emption sends SIGTERM to every process of the batch step, scontrol too: the empty node
    list is the stop's doing, not an error (it was status 2, not requeued)."""
    bin_, calls = sbatch_stand_ins(tmp_path, "node0\\n")
    (bin_ / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\n'
                                   f'[[ "$1" == show ]] && {{ touch {tmp_path}/listing; sleep 5; printf "node0\\n"; }}\n'
                                   "exit 0\n")
    submit = submit_folder(tmp_path, f"touch {tmp_path}/ran\n")
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "slurm.sbatch")], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**env(), "PATH": f"{bin_}:{env()['PATH']}", "SLURM_SUBMIT_DIR": str(submit),
                                 "SLURM_JOB_NODELIST": "node0", "SLURM_JOB_ID": "66"})
    deadline = time.monotonic() + 30
    while not (tmp_path / "listing").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    assert "a stop was asked for before any node started" in err and "requeue 66" in calls.read_text()
    assert not (tmp_path / "ran").exists()


def test_a_requeue_that_fails_says_so(tmp_path):
    """scontrol requeue refused (the job was cancelled, or requeue is not allowed): one line saying
    to submit it again; the status stays 75."""
    bin_, calls = sbatch_stand_ins(tmp_path, "node0\\n")
    (bin_ / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\n'
                                   '[[ "$1" == show ]] && printf "node0\\n"\n[[ "$1" == requeue ]] && exit 1\nexit 0\n')
    submit = submit_folder(tmp_path, "exit 75\n")
    proc = sbatch(tmp_path, bin_, submit, SLURM_JOB_NODELIST="node0", SLURM_JOB_ID="67")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    assert "scontrol requeue failed (status 1" in err and "submit it again to continue" in err


def test_jobs_outside_slurm_do_not_share_status_files(tmp_path):
    """Without SLURM_JOB_ID the status files are this script's own (local-<pid>): another job's in
    the same runs/ folder (here node 1's 3) is neither removed nor read."""
    bin_, _ = sbatch_stand_ins(tmp_path, "node0\\nnode1\\n")
    submit = submit_folder(tmp_path, "exit 0\n")
    (submit / "runs").mkdir()
    (submit / "runs" / "status-local.1").write_text("3\n")  # another job's, as the script named them
    env_ = {k: v for k, v in env().items() if k != "SLURM_JOB_ID"}
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={**env_, "PATH": f"{bin_}:{env_['PATH']}",
                                                     "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_SUBMIT_DIR": str(submit)})
    assert out.returncode == 0, out.stderr
    assert (submit / "runs" / "status-local.1").read_text() == "3\n"
    mine = sorted(p.name for p in (submit / "runs").glob("status-local-*"))
    assert len(mine) == 2 and mine[0].endswith(".0") and mine[1].endswith(".1"), mine


@pytest.mark.parametrize("nodelist, listed", [(None, ""), ("node[0-1]", "")])
def test_a_job_without_nodes_is_one_line(tmp_path, nodelist, listed):
    bin_, _ = sbatch_stand_ins(tmp_path, listed)
    submit = submit_folder(tmp_path, f"touch {tmp_path}/ran\n")
    env_ = {k: v for k, v in env().items() if k != "SLURM_JOB_NODELIST"}
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={**env_, "PATH": f"{bin_}:{env_['PATH']}",
                                                     "SLURM_SUBMIT_DIR": str(submit), "SLURM_JOB_ID": "64",
                                                     **({"SLURM_JOB_NODELIST": nodelist} if nodelist else {})})
    assert out.returncode == 2 and not (tmp_path / "ran").exists()
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("[resure_ds] error: SLURM_JOB_NODELIST")


def test_a_warning_as_the_node_starts_is_not_lost(tmp_path):
    """SIGUSR1 to the batch script just after it forked the shell that runs launch/train.sh, before
    train.sh exists to be signalled (bash made slow to start): the signal reached no one and the job
    trained to its end (0); now the script makes RESURE_STOP_FILE first, train.sh finds it before
    starting any rank, and the job requeues (75)."""
    bin_, calls = sbatch_stand_ins(tmp_path, "localhost\\n")
    stand_in(bin_, "py", 'case "$*" in *data.prepare*) exit 0;; *) echo "RUN $*";; esac\n')
    stand_in(bin_, "bash", f'[[ $1 == -c && $2 == node=0* ]] && {{ touch {tmp_path}/forking; sleep 1; }}\n'
                           'exec /bin/bash "$@"\n')  # the shell that runs train.sh, made slow to start
    proc = repo_sbatch(tmp_path, bin_, "65")
    out, err = warn_when(proc, tmp_path / "forking")
    assert proc.returncode == 75, err
    assert "a stop was asked for while preparing: no rank started" in err and "RUN" not in out
    assert "requeue 65" in calls.read_text() and os.path.exists(os.path.join(ROOT, "runs", "status-65.stop"))


@pytest.mark.parametrize("how", ["file", "signal"])
def test_on_several_nodes_a_stop_while_preparing_is_handed_to_the_ranks(tmp_path, how):
    """One node of several (NODE_RANK) whose data are ready: it exited 75 before starting its ranks,
    while another node's ranks, already started, waited for them at the rendezvous until dist.timeout
    (a failed job). Now it starts its ranks with RESURE_STOP_FILE made, and every rank ends together
    right after the rendezvous (tests/test_faults). A stop by signal gets a file of its own."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    stand_in(bin_, "py", f'case "$*" in *data.prepare*) touch {tmp_path}/preparing; sleep 1; exit 0;; '
                         '*) echo "RUN $* STOP=${RESURE_STOP_FILE:-}"; [[ -e ${RESURE_STOP_FILE:-/none} ]] && '
                         'echo MADE;; esac\n')
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    marker = tmp_path / "status-9.stop"
    if how == "file":
        marker.touch()
    proc = subprocess.Popen(["bash", TRAIN, "recipes/sft.yaml"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={"HOME": str(tmp_path), "PATH": f"{bin_}:/usr/bin:/bin", "TMPDIR": str(tmp_path),
                                            "PYTHON": str(bin_ / "py"), "MASTER_PORT": "5", "MASTER_ADDR": "node0",
                                            "HOSTFILE": str(hostfile), "NODE_RANK": "1",
                                            **({"RESURE_STOP_FILE": str(marker)} if how == "file" else {})})
    if how == "signal":
        out, err = warn_when(proc, tmp_path / "preparing")
    else:
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "resure_ds.node" in out and "--node-rank 1" in out and "MADE" in out, out
    assert err.count("this node's ranks start, and stop with the other nodes' after their rendezvous") == 1, err
    if how == "signal":
        assert f"STOP={tmp_path}/resure-stop." in out


def test_a_node_rank_that_is_not_a_number_is_one_line():
    out = subprocess.run(["bash", TRAIN, "recipes/sft.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**env(), "HOSTFILE": "H", "NODE_RANK": "abc", "MASTER_ADDR": "n0", "MASTER_PORT": "5"})
    assert out.returncode == 2
    assert out.stderr == "[resure_ds] error: NODE_RANK=abc: give this node's line in HOSTFILE, from 0\n"


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
