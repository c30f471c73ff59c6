"""The real recipe through the real launchers: 2 ranks on gloo, a tiny model,
the embedded chitchat corpus (prepared once, packed rows, 2% held out for
validation). Straight run vs the same command stopped and repeated, vs
resumes on another number of ranks; validation vs resure_ds.eval on the
export; export reloaded with plain transformers; MPI and SLURM launches.
Faults (killed ranks, killed saves, two nodes) are in test_faults.py."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.e2e_common import (COMMON, EXIT_RESUME, HOLDOUT, assert_same_training, audit, env, launch, metrics,
                              shm_buffers, wait_for_a_step)

pytestmark = pytest.mark.slow  # real multi-process runs: minutes

def test_straight_run_outputs(straight):
    rows = metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    fields = {"loss", "weighted_loss", "tokens_per_s", "lr", "bucket_n", "bucket_mean", "bucket_std",
              "mean_weight", "frac_w_lt_1", "frac_w_lt_0.5", "nonfinite_turns"}
    assert fields <= set(rows[-1])
    assert min(r["mean_weight"] for r in rows) < 1.0  # weighting became active after warm-up
    assert rows[-1]["bucket_n"][0] > 0
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]  # eval.every=3, and the end
    with open(os.path.join(straight, "summary.txt"), encoding="utf-8") as f:
        summary = f.read()
    assert "final loss" in summary and "no_assistant_turn=3150" in summary and "validation loss at step 6" in summary
    assert all(r["source"] == "chitchat" for r in audit(straight))
    # data.overflow=split (the default): long dialogues are trained as windows, each reply once (within
    # the run's first epoch) under its own index in the dialogue, and summary.txt says what was split
    keys = [(r["dialogue_id"], r["turn"]) for r in audit(straight)]
    assert len(keys) == len(set(keys)) and max(t for _, t in keys) >= 8
    assert "(data.overflow=split): " in summary and " dialogue(s) split into " in summary
    assert os.path.getsize(os.path.join(straight, "training.png")) > 10000
    with open(os.path.join(straight, "report.html"), encoding="utf-8") as f:
        page = f.read()
    assert "Reliability per source" in page and "<td class=\"t\">chitchat</td>" in page
    from tests.test_trackers import read_trackers

    logged, wandb = read_trackers(straight, [r["step"] for r in rows])
    for name, losses in logged.items():  # the same losses in every tracker
        assert losses == pytest.approx([r["loss"] for r in rows], rel=1e-6), name
    assert all(json.dumps(r["loss"]).encode() in wandb for r in rows)
    assert len(audit(straight)) == sum(r["turns"] for r in rows)
    for r in rows:  # the step's time split covers the step
        split = {k: v for k, v in r.items() if k.startswith("time_")}
        assert set(split) == {f"time_{p}_s" for p in ("data", "collectives", "forward", "resure", "backward",
                                                        "optimizer", "bookkeeping")}
        assert min(split.values()) >= 0 and split["time_forward_s"] > 0 and split["time_backward_s"] > 0
        assert sum(split.values()) == pytest.approx(r["step_time_s"], rel=0.02, abs=0.01)


def test_logits_path_and_eager_attention_train_like_the_fused_path(straight, tiny_model_path):
    """model.fused_loss=false (the model's [tokens, vocab] logits, then the NLL) and eager attention:
    the same turns, weights, statistics and losses as the straight run (fused head and loss, sdpa)."""
    out, shm = os.path.dirname(straight), shm_buffers()
    res = launch("train.sh", ["recipes/default.yaml", f"model.path={tiny_model_path}", *COMMON, f"output.dir={out}",
                              "output.name=logits-eager", "model.fused_loss=false", "model.attn_implementation=eager"])
    assert "eager attention, logits path" in res.stderr
    assert shm_buffers() <= shm  # DeepSpeed's /dev/shm all-reduce buffers are unlinked once mapped
    assert_same_training(straight, os.path.join(out, "logits-eager"), rel=1e-4)


@pytest.fixture(scope="module")
def stopped(straight, tiny_model_path):
    """Runs stopped after step 3 of 6 on 1 or 2 ranks (global batch 4), made once, copied by the tests."""
    made = {}

    def get(ranks: int, name: str) -> tuple[str, list[str]]:
        out = os.path.dirname(straight)
        if ranks not in made:
            args = ["recipes/default.yaml", f"model.path={tiny_model_path}", *COMMON, f"output.dir={out}",
                    f"train.micro_batch_size={4 // ranks}"]
            first = launch("train.sh", [*args, f"output.name=stopped{ranks}", "train.stop_after=3"],
                           extra_env={"NUM_PROCS": str(ranks)}, status=EXIT_RESUME)
            assert "stopped at step 3 of 6 (train.stop_after)" in first.stderr
            made[ranks] = os.path.join(out, f"stopped{ranks}")
        shutil.copytree(made[ranks], os.path.join(out, name))
        return os.path.join(out, name), ["recipes/default.yaml", f"model.path={tiny_model_path}", *COMMON,
                                         f"output.dir={out}", f"output.name={name}"]

    return get


def test_same_command_three_times_finishes_like_a_straight_run(straight, tiny_model_path):
    """A requeue loop: stop_after counts from where each invocation starts, so three runs of one
    command (2 + 2 + 2 steps of 6) finish the job, with exit status 75, 75, 0."""
    out = os.path.dirname(straight)
    args = ["recipes/default.yaml", f"model.path={tiny_model_path}", *COMMON, f"output.dir={out}",
            "output.name=thrice", "train.stop_after=2"]
    legs = [launch("train.sh", args, status=s) for s in (EXIT_RESUME, EXIT_RESUME, 0)]
    assert "stopped at step 2 of 6" in legs[0].stderr
    assert "at step 2 (rows" in legs[1].stderr and "stopped at step 4 of 6" in legs[1].stderr
    assert "at step 4 (rows" in legs[2].stderr and "final loss" in legs[2].stdout
    assert_same_training(straight, os.path.join(out, "thrice"))


def test_validation_equals_eval_of_the_export(straight):
    """The last validation pass (all ranks, all-reduced) equals resure_ds.eval on the fp32 export
    over the same held-out split, per turn depth, within 1e-4."""
    row = [r for r in metrics(straight) if "val_loss" in r][-1]
    out = subprocess.run([sys.executable, "-m", "resure_ds.eval", os.path.join(straight, "export"), "chitchat",
                          "--max-length", "128", "--holdout", HOLDOUT], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ref = json.loads(out.stdout)
    assert ref["dialogues"] == row["val_dialogues"] and ref["turns"] == row["val_turns"]
    assert ref["tokens"] == row["val_tokens"]
    assert abs(ref["loss"] - row["val_loss"]) < 1e-4 and abs(ref["turn_loss"] - row["val_turn_loss"]) < 1e-4
    depths = sorted(int(t) for t in ref["per_depth"])
    assert depths == list(range(len(row["val_depth_loss"]))) and len(depths) > 1
    for t in depths:
        assert abs(ref["per_depth"][str(t)]["loss"] - row["val_depth_loss"][t]) < 1e-4, t
        assert ref["per_depth"][str(t)]["turns"] == row["val_depth_turns"][t], t


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks(straight, stopped, before, after):
    """Stopped on `before` ranks, resumed on `after` with the same global batch (4 rows): the same
    dialogues in the same steps from the stop point, the same statistics, the same losses."""
    run, args = stopped(before, f"regrid{before}to{after}")
    second = launch("train.sh", [*args, f"train.micro_batch_size={4 // after}", "train.zero_stage=auto"],
                    extra_env={"NUM_PROCS": str(after)})
    assert f"saved on {before} rank(s), now {after}" in second.stderr
    assert "train.zero_stage=auto: ZeRO-3, the stage of the checkpoint it resumes" in second.stderr
    a, b = metrics(straight), metrics(run)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6] and [r["rows_seen"] for r in b] == [4, 8, 12, 16, 20, 24]
    for ra, rb in zip(a, b):
        assert ra["bucket_n"] == rb["bucket_n"], ra["step"]  # the same turns merged, step by step
        for k in ("loss", "weighted_loss", "mean_weight", "bucket_mean", "bucket_std", "lr", "val_loss"):
            if k in ra:
                # fp32 rounding of other batch shapes (1 rank x 4 rows vs 2 x 2) before the stop
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6, nan_ok=True), (ra["step"], k)
    turns = lambda r: sorted((x["step"], x["dialogue_id"], x["turn"]) for x in audit(r) if x["step"] > 3)  # noqa: E731
    assert turns(straight) and turns(straight) == turns(run)
    assert {x["rank"] for x in audit(run) if x["step"] > 3} == set(range(after))  # rows of steps > 3: new ranks


def test_export_loads_with_plain_transformers(straight, tiny_model_path):
    code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "p = sys.argv[1]; m = AutoModelForCausalLM.from_pretrained(p); t = AutoTokenizer.from_pretrained(p); "
            "ids = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True, "
            "return_tensors='pt', return_dict=True)['input_ids']; "
            "out = m(input_ids=ids).logits; assert torch.isfinite(out).all(); "
            "assert 'deepspeed' not in sys.modules; print(next(m.parameters()).dtype)")
    out = subprocess.run([sys.executable, "-c", code, os.path.join(straight, "export")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    from safetensors.torch import load_file

    new = load_file(os.path.join(straight, "export", "model.safetensors"))
    old = load_file(os.path.join(tiny_model_path, "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight"
    assert new[key].dtype == torch.float32  # checkpoint.export_dtype=fp32 (the mpirun test checks bf16)
    assert not torch.equal(new[key], old[key])  # training moved the weights


def test_report_lists_downweighted_turns_with_text(straight):
    out = subprocess.run([sys.executable, "-m", "resure_ds.report", straight, "--top", "3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("w=")]
    assert len(lines) == 3 and all("turn" in ln and "'" in ln for ln in lines)


def test_bad_config_fails_before_launch(tiny_model_path):
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", "train.sh"), "train.mehtod=sft"], cwd=ROOT,
                         env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "train.mehtod: unknown key" in out.stderr
    assert "dist_world_size" not in out.stdout + out.stderr  # the launcher never started


def test_bad_data_is_one_clear_error(tmp_path, tiny_model_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": 7}]}\n')
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", "train.sh"), f"model.path={tiny_model_path}",
                          f"data.train={bad}", "data.skip_invalid=false", f"output.dir={tmp_path}"],
                         cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "bad.jsonl line 2: message 0 (user) has 'content' of type int, not a string" in out.stderr
    assert "data.skip_invalid=true" in out.stderr and "Traceback" not in out.stderr


def test_mpirun_launch_zero2_loss_truncation_varlen_profiled(tmp_path, tiny_model_path):
    """mpirun, ZeRO-2, loss truncation, varlen attention (per dialogue, no mask; its numbers against
    the mask: test_packing.py) through the start-up packing check, and step 2 profiled."""
    if shutil.which("mpirun", path=env()["PATH"]) is None:
        pytest.fail("mpirun is not installed: pip install -r requirements-dev.txt (mpich)")
    res = launch("mpirun.sh", ["recipes/default.yaml", f"model.path={tiny_model_path}", "train.max_steps=2",
                               "train.zero_stage=2", "train.method=loss_truncation", "data.max_length=96",
                               "model.attn_implementation=varlen", "train.profile_steps=2", f"output.dir={tmp_path}",
                               "output.name=mpi"])
    assert "ZeRO-2" in res.stderr and "varlen attention" in res.stderr
    profile = (tmp_path / "mpi" / "profile.txt").read_text()
    assert profile.startswith("steps 2-2: ") and "aten::mm" in profile and "Self CPU" in profile
    assert json.loads((tmp_path / "mpi" / "profile.json").read_text())["traceEvents"]
    rows = metrics(os.path.join(tmp_path, "mpi"))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["bucket_n"][0] > 0 for r in rows)
    from safetensors.torch import load_file

    weights = load_file(os.path.join(tmp_path, "mpi", "export", "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}  # checkpoint.export_dtype default


def test_slurm_script_single_node_auto_zero_sft_forwards_the_warning_and_requeues(tmp_path, tiny_model_path):
    """slurm.sbatch on a one-node allocation: a local launch, no ssh needed. SIGUSR1 to the batch
    script (what --signal=B:USR1@300 sends) reaches the ranks, which save and exit 75; the script
    requeues the job, and the requeued job finishes it. (Multi-node needs a second machine: the
    hostfile path over ssh is DeepSpeed's runner; test_faults.py runs two launchers, one per
    "node" with NODE_RANK, on this machine.)"""
    import signal

    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "scontrol.log"
    (fake / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\n'
                                   '[[ "$1" == show ]] && echo localhost\nexit 0\n')
    (fake / "scontrol").chmod(0o755)
    run = os.path.join(tmp_path, "slurm")

    def job():
        return subprocess.Popen(
            ["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "recipes/default.yaml",
             f"model.path={tiny_model_path}", "train.max_steps=20", "train.zero_stage=auto", "train.method=sft",
             "data.max_length=96", "checkpoint.export=false", "checkpoint.every=0", f"output.dir={tmp_path}",
             "output.name=slurm"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**env(), "PATH": f"{fake}{os.pathsep}{env()['PATH']}", "SLURM_JOB_NODELIST": "localhost",
                 "SLURM_JOB_ID": "42", "GPUS_PER_NODE": "2"})

    first = job()
    wait_for_a_step(first, run)
    first.send_signal(signal.SIGUSR1)
    out, err = first.communicate(timeout=300)
    assert first.returncode == EXIT_RESUME, err[-5000:]
    # a tiny model: every stage fits this machine's memory, so auto is ZeRO-0, kept on the requeue
    assert "train.zero_stage=auto: ZeRO-0, the lowest stage whose plan fits 90%" in err
    assert "[resure_ds] node 0 of 1 node(s): ranks 0 to 1 of 2" in err
    assert "requeue 42" in calls.read_text() and "(a signal (SIGTERM/SIGUSR1))" in err
    stopped_at = len(metrics(run))
    assert 1 <= stopped_at < 20
    second = job()
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-5000:]
    assert "train.zero_stage=auto: ZeRO-0, the stage of the checkpoint it resumes" in err
    assert calls.read_text().count("requeue") == 1  # a finished job is not requeued
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 21)) and all(r["mean_weight"] == 1.0 for r in rows)


# srun's stand-in, as Slurm's srun behaves: one task per node of the job's node list (here all on this
# machine), each with SLURM_NODEID and in a process group of its own; SIGUSR1 passed to every process
# of every task; SIGTERM answered by killing every task (srun's "forcing job termination"); the
# highest task status is its own.
FAKE_SRUN = r"""#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
pids=(); i=0
for _ in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do SLURM_NODEID=$i setsid "$@" & pids+=($!); i=$((i + 1)); done
trap 'for q in "${pids[@]}"; do kill -USR1 -- "-$q"; done' USR1
trap 'for q in "${pids[@]}"; do kill -KILL -- "-$q"; done' TERM
rc=0
for p in "${pids[@]}"; do
  while kill -0 "$p" 2>/dev/null; do wait "$p"; done
  wait "$p"; c=$?; (( c > rc )) && rc=$c
done
exit $rc
"""


def test_slurm_script_on_two_nodes_runs_a_launcher_per_node_and_requeues_on_the_warning(tmp_path, tiny_model_path):
    """slurm.sbatch on a two-node allocation (two "nodes" on this machine, srun's stand-in above):
    one launch/train.sh per node with NODE_RANK, no ssh. SIGUSR1 to the batch script reaches srun,
    which passes it to each node's launcher, which passes it to its rank: both stop with a
    checkpoint, the job's status is 75 and it requeues itself."""
    import signal

    from tests.dist import free_port

    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "scontrol.log"
    (fake / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\n'
                                   '[[ "$1" == show ]] && printf "node0\\nnode1\\n"\nexit 0\n')
    (fake / "srun").write_text(FAKE_SRUN)
    for f in fake.iterdir():
        f.chmod(0o755)
    run = os.path.join(tmp_path, "slurm2")
    job = subprocess.Popen(
        ["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "recipes/default.yaml", f"model.path={tiny_model_path}",
         "train.max_steps=20", "data.max_length=96", "checkpoint.export=false", "checkpoint.every=0",
         "output.report=false", "output.plot=false", f"output.dir={tmp_path}", "output.name=slurm2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env(), "PATH": f"{fake}{os.pathsep}{env()['PATH']}", "SLURM_JOB_NODELIST": "node[0-1]",
             "SLURM_JOB_ID": "43", "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(free_port()), "HOSTFILE": str(tmp_path / "hostfile"), "OMP_NUM_THREADS": "1"})
    wait_for_a_step(job, run)
    job.send_signal(signal.SIGUSR1)
    _, err = job.communicate(timeout=300)
    assert job.returncode == EXIT_RESUME, err[-5000:]
    assert (tmp_path / "hostfile").read_text() == "node0 slots=1\nnode1 slots=1\n"
    assert "node 0 of 2 node(s): ranks 0 to 0 of 2" in err and "node 1 of 2 node(s): ranks 1 to 1 of 2" in err
    # srun signals every process: the loader's worker and multiprocessing's resource tracker outlive it
    assert "resource_tracker: process died unexpectedly" not in err and "DataLoader worker" not in err
    assert "requeue 43" in calls.read_text() and "(a signal (SIGTERM/SIGUSR1)); checkpoint saved" in err
    assert 1 <= len(metrics(run)) < 20
