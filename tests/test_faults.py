"""Faults under the real launchers (2 ranks on gloo, the tiny model, the e2e recipe): a rank killed
mid-step, a rank killed inside a checkpoint save, a stop signal, and a two-"node" run (two
launchers on this machine, one rank each, over loopback). Each job ends within a bounded time, and
the same command then resumes and trains exactly as the straight run did."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.conftest import ROOT
from tests.e2e_common import (COMMON, EXIT_RESUME, assert_same_training, env, launch, metrics, shm_buffers,
                               wait_for_a_step)

pytestmark = pytest.mark.slow  # real multi-process runs: minutes


def args_for(tiny_model_path, out, name, *extra):
    return ["recipes/default.yaml", f"model.path={tiny_model_path}", *COMMON, f"output.dir={out}",
            f"output.name={name}", *extra]


def chitchat_in_store(st, folder) -> str:
    """The embedded corpus's dialogues (those the recipe trains) as one JSONL object in the store: the
    same rows, in the same order, as the straight run's."""
    from resure_ds.data.records import read_dialogues

    path = folder / "chitchat.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for d in read_dialogues("chitchat", skip_invalid=True):
            f.write(json.dumps({"id": d.dialogue_id, "messages": d.messages}) + "\n")
    st.client().create_bucket(Bucket="corpus")
    st.client().upload_file(str(path), "corpus", "chat/chitchat.jsonl")
    return str(path)


def test_rank_killed_mid_step_ends_the_job_and_the_same_command_resumes(straight, tiny_model_path, tmp_path):
    """RESURE_FAULT kills rank 1 with SIGKILL in the middle of step 5 (after its forward): the job
    exits non-zero well within dist.timeout; the repeated command resumes from step 4.
    The data are in an object store (moto's S3 server on loopback, tests/s3_server.py): data.train and
    data.prepared_dir are s3:// URLs. The source object edited between the two launches is refused on
    resume; uploaded again as it was (the same ETag: an ETag depends on the bytes and the upload's part
    size) the resume reads no shard from the store again and trains as the straight run did. No byte of the store's secret key is written anywhere."""
    from tests.s3_server import SECRET, listening, s3_store

    with s3_store(str(tmp_path)) as st:
        local = chitchat_in_store(st, tmp_path)
        store_env = {**st.env, "RESURE_CACHE": str(tmp_path / "cache")}
        args = args_for(tiny_model_path, tmp_path, "killed", "checkpoint.every=2", "dist.timeout=60",
                        # named as the embedded source is, so the per-source metrics compare
                        'data.train=[{"path": "s3://corpus/chat/chitchat.jsonl", "name": "chitchat"}]',
                        "data.prepared_dir=s3://corpus/prepared")
        t0, shm = time.monotonic(), shm_buffers()
        first = launch("train.sh", args, extra_env={**store_env, "RESURE_FAULT": "step:5:1"}, status=None)
        elapsed = time.monotonic() - t0
        assert first.returncode != 0 and "killing rank 1 during the step of step 5" in first.stderr
        assert shm_buffers() <= shm  # killed ranks leave no shared-memory buffer (memory) behind
        assert elapsed < 240, elapsed  # start-up (about a minute here) + the launcher's 30 s grace at most
        run = os.path.join(tmp_path, "killed")
        assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
        assert any(k.endswith("/manifest.json") for k in st.keys("corpus", "prepared/"))
        body = open(local, "rb").read()
        st.client().put_object(Bucket="corpus", Key="chat/chitchat.jsonl", Body=body.replace(b"?", b"!", 1))
        edited = launch("train.sh", args, extra_env=store_env, status=None)
        assert edited.returncode != 0 and "prepared as" in edited.stderr and "its files" in edited.stderr
        st.client().upload_file(local, "corpus", "chat/chitchat.jsonl")  # as first uploaded: the same ETag
        shard_reads = [r for r in st.requests() if r.startswith("GET") and r.endswith(".arrow")]
        second = launch("train.sh", args, extra_env=store_env)
        assert "resumed from" in second.stderr and "step0000004 at step 4" in second.stderr
        assert [r for r in st.requests() if r.startswith("GET") and r.endswith(".arrow")] == shard_reads
    assert not listening(st.port)
    assert_same_training(straight, run)
    assert SECRET not in "".join(o.stdout + o.stderr for o in (first, edited, second))
    for root, _, files in os.walk(tmp_path):
        for f in files:
            if not f.startswith("moto-"):  # the server's own log
                with open(os.path.join(root, f), "rb") as fh:
                    assert SECRET.encode() not in fh.read(), os.path.join(root, f)


def test_rank_killed_during_a_save_resumes_from_the_previous_checkpoint(straight, tiny_model_path, tmp_path):
    """Rank 1 dies inside the save of step 4 (after DeepSpeed wrote its files, before the publish):
    step 4 stays unpublished (.saving), `latest` still names step 2, and a resume starts there."""
    args = args_for(tiny_model_path, tmp_path, "torn", "checkpoint.every=2", "dist.timeout=60")
    first = launch("train.sh", args, extra_env={"RESURE_FAULT": "save:4:1"}, status=None)
    assert first.returncode != 0
    ckpts = os.path.join(tmp_path, "torn", "checkpoints")
    assert {"step0000002", "step0000004.saving"} <= set(os.listdir(ckpts))
    assert "step0000004" not in os.listdir(ckpts)
    with open(os.path.join(ckpts, "latest"), encoding="utf-8") as f:
        assert f.read() == "step0000002"
    second = launch("train.sh", args)
    assert "step0000002 at step 2" in second.stderr
    # both ranks had flushed their audit rows of steps 3-4 before the save died: the resume drops them
    assert "audit: dropped" in second.stdout + second.stderr
    assert not any(n.endswith(".saving") for n in os.listdir(ckpts))  # the torn save was cleared
    assert_same_training(straight, os.path.join(tmp_path, "torn"))


def test_damaged_checkpoint_is_named_on_resume(straight, tiny_model_path, tmp_path):
    """A published checkpoint whose file was truncated afterwards: resume refuses it by name."""
    src = os.path.join(os.path.dirname(straight), "straight", "checkpoints")
    run = tmp_path / "damaged"
    shutil.copytree(src, run / "checkpoints")
    tag = sorted(n for n in os.listdir(run / "checkpoints") if n.startswith("step"))[-1]
    victim = run / "checkpoints" / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(victim, "r+b") as f:
        f.truncate(100)
    out = launch("train.sh", args_for(tiny_model_path, tmp_path, "damaged"), status=2)
    assert f"checkpoint {run / 'checkpoints' / tag} is damaged" in out.stderr
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt has 100 bytes" in out.stderr


def test_stop_signal_saves_and_exits_75(straight, tiny_model_path, tmp_path):
    """SIGTERM to the launcher and to every rank at once (what SLURM does to a pre-empted job): every
    rank stops at the next step boundary with a checkpoint, and the job's status is 75 (DeepSpeed's
    per-node launcher killed the ranks and exited 1). The same command finishes like the straight
    run. (SIGUSR1 to one rank, what slurm.sbatch forwards: tests/test_e2e.py's SLURM test.)"""
    args = args_for(tiny_model_path, tmp_path, "signalled")
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "train.sh"), *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_a_step(proc, os.path.join(tmp_path, "signalled"))
    for pid in (proc.pid, rank_pid(0, "output.name=signalled"), rank_pid(1, "output.name=signalled")):
        os.kill(pid, signal.SIGTERM)  # proc.pid: train.sh exec'd the launcher
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_RESUME, err[-4000:]
    assert "(a signal (SIGTERM/SIGUSR1)); checkpoint saved" in err
    done = [r["step"] for r in metrics(os.path.join(tmp_path, "signalled"))]
    assert 1 <= len(done) < 6
    launch("train.sh", args)
    assert_same_training(straight, os.path.join(tmp_path, "signalled"))


def rank_pid(rank: int, marker: str) -> int:
    """The training process of a rank, found by its command line and RANK in its environment."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if "resure_ds.train" in cmd and marker in cmd and f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no process of rank {rank} with {marker}")


def test_two_nodes_over_loopback_train_save_and_resume(straight, tiny_model_path, tmp_path):
    """Two launchers (NODE_RANK 0 and 1, a two-host hostfile, no ssh), one rank each: the same
    global run as 2 local ranks. Stopped after 3 steps, then the same pair of commands finishes.
    Each rank gets the straight run's thread count (train.sh gives a rank nproc / local ranks): on
    CPU the backward's reductions round differently with more threads, and the weights after
    step 1 would differ in the last bits (seen: a bucket mean 3.6e-7 off at step 2)."""
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    args = args_for(tiny_model_path, tmp_path, "twonode", "train.stop_after=3")
    from tests.dist import free_port

    def pair():
        port = str(free_port())
        procs = [subprocess.Popen(["bash", os.path.join(ROOT, "launch", "train.sh"), *args], cwd=ROOT,
                                  env={**env(), "HOSTFILE": str(hostfile), "NODE_RANK": str(n),
                                       "OMP_NUM_THREADS": threads, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
        outs = [p.communicate(timeout=600) for p in procs]
        return [p.returncode for p in procs], outs

    codes, outs = pair()
    assert codes == [EXIT_RESUME, EXIT_RESUME], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "node 1 of 2 node(s): ranks 1 to 1 of 2" in outs[1][1]
    codes, outs = pair()
    assert codes == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "at step 3 (rows" in outs[0][1]
    assert_same_training(straight, os.path.join(tmp_path, "twonode"))


def test_a_stop_to_one_nodes_rank_while_it_starts_ends_both_nodes_together(tiny_model_path, tmp_path):
    """Two nodes over loopback (a hostfile, NODE_RANK 0 and 1, one rank each). SIGUSR1 to node 1's
    rank while it still imports (a second after it exists): it died of it, counted as stopped on its
    node (75), while node 0's rank waited for it at the rendezvous until dist.timeout and failed. Now
    the rank records it from its first line, and after the rendezvous every rank agrees to stop
    before anything is loaded or written: both nodes exit 75, and no run folder is made."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    args = args_for(tiny_model_path, tmp_path, "startstop", "dist.timeout=60")
    from tests.dist import free_port

    port = str(free_port())
    procs = [subprocess.Popen(["bash", os.path.join(ROOT, "launch", "train.sh"), *args], cwd=ROOT,
                              env={**env(), "HOSTFILE": str(hostfile), "NODE_RANK": str(n), "OMP_NUM_THREADS": "1",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    deadline = time.monotonic() + 120
    while True:
        try:
            pid = rank_pid(1, "output.name=startstop")
            break
        except AssertionError:
            assert time.monotonic() < deadline, "node 1's rank did not start"
            time.sleep(0.01)
    time.sleep(1.0)  # past the interpreter's start, into the imports (seconds)
    os.kill(pid, signal.SIGUSR1)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [EXIT_RESUME, EXIT_RESUME], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "a stop was asked for as the ranks started: no step run, nothing saved" in outs[0][0] + outs[0][1]
    assert not os.path.exists(os.path.join(tmp_path, "startstop"))
