"""The real recipe through the real launchers: 2 ranks on gloo, a tiny model,
the embedded chitchat corpus (prepared once, packed rows). Straight run vs
interrupted + resumed run, on the same and on another number of ranks,
export reloaded with plain transformers, MPI launch."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # real multi-process runs: minutes

PREPARED = os.path.join(ROOT, "runs", ".test-prepared")  # one prepare serves the module's runs
COMMON = ["train.max_steps=6", "data.max_length=128", "train.micro_batch_size=2", "resure.min_count=4",
          "checkpoint.every=0", "output.tensorboard=true", f"data.prepared_dir={PREPARED}"]


def env():
    e = dict(os.environ)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e["PYTHON"] = sys.executable
    e["NUM_PROCS"] = "2"
    e.pop("MASTER_PORT", None)
    return e


def launch(script, args, timeout=600, extra_env=None):
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], cwd=ROOT,
                         env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(ln) for ln in f]


def audit(run_dir):
    rows = []
    for name in sorted(os.listdir(os.path.join(run_dir, "audit"))):
        with open(os.path.join(run_dir, "audit", name), encoding="utf-8") as f:
            rows += [json.loads(ln) for ln in f]
    return sorted(rows, key=lambda r: (r["step"], r["dialogue_id"], r["turn"]))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_path):
    out = str(tmp_path_factory.mktemp("runs"))
    launch("train.sh", ["recipes/default.yaml", f"model.path={tiny_model_path}", *COMMON,
                        f"output.dir={out}", "output.name=straight"])
    return os.path.join(out, "straight")


def test_straight_run_outputs(straight):
    rows = metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    fields = {"loss", "weighted_loss", "tokens_per_s", "lr", "bucket_n", "bucket_mean", "bucket_std",
              "mean_weight", "frac_w_lt_1", "frac_w_lt_0.5", "nonfinite_turns"}
    assert fields <= set(rows[-1])
    assert min(r["mean_weight"] for r in rows) < 1.0  # weighting became active after warm-up
    assert rows[-1]["bucket_n"][0] > 0
    with open(os.path.join(straight, "summary.txt"), encoding="utf-8") as f:
        summary = f.read()
    assert "final loss" in summary and "no_assistant_turn=3150" in summary
    assert all(r["source"] == "chitchat" for r in audit(straight))
    assert os.path.getsize(os.path.join(straight, "training.png")) > 10000
    assert os.listdir(os.path.join(straight, "tensorboard"))
    assert len(audit(straight)) == sum(r["turns"] for r in rows)


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
                           extra_env={"NUM_PROCS": str(ranks)})
            assert "stopped at step 3 of 6" in first.stderr
            made[ranks] = os.path.join(out, f"stopped{ranks}")
        shutil.copytree(made[ranks], os.path.join(out, name))
        return os.path.join(out, name), ["recipes/default.yaml", f"model.path={tiny_model_path}", *COMMON,
                                         f"output.dir={out}", f"output.name={name}"]

    return get


def test_interrupted_and_resumed_run_matches_straight_run(straight, stopped):
    run, args = stopped(2, "resumed")
    second = launch("train.sh", args)
    assert "at step 3" in second.stderr
    a, b = metrics(straight), metrics(run)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a[3:], b[3:]):
        for k in ("loss", "weighted_loss", "mean_weight", "frac_w_lt_1", "bucket_n", "bucket_mean", "bucket_std"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-9, nan_ok=True), (ra["step"], k)
    wa = [(r["dialogue_id"], r["turn"], r["weight"], r["loss"]) for r in audit(straight) if r["step"] > 3]
    wb = [(r["dialogue_id"], r["turn"], r["weight"], r["loss"]) for r in audit(run) if r["step"] > 3]
    assert wa and [x[:2] for x in wa] == [x[:2] for x in wb]  # the same turns, in the same steps
    for x, y in zip(wa, wb):
        assert x[2] == pytest.approx(y[2], rel=1e-9) and x[3] == pytest.approx(y[3], rel=1e-9)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks(straight, stopped, before, after):
    """Stopped on `before` ranks, resumed on `after` with the same global batch (4 rows): the same
    dialogues in the same steps from the stop point, the same statistics, the same losses."""
    run, args = stopped(before, f"regrid{before}to{after}")
    second = launch("train.sh", [*args, f"train.micro_batch_size={4 // after}"], extra_env={"NUM_PROCS": str(after)})
    assert f"saved on {before} rank(s), now {after}" in second.stderr
    a, b = metrics(straight), metrics(run)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6] and [r["rows_seen"] for r in b] == [4, 8, 12, 16, 20, 24]
    for ra, rb in zip(a, b):
        assert ra["bucket_n"] == rb["bucket_n"], ra["step"]  # the same turns merged, step by step
        for k in ("loss", "weighted_loss", "mean_weight", "bucket_mean", "bucket_std", "lr"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, nan_ok=True), (ra["step"], k)
    turns = lambda r: sorted((x["step"], x["dialogue_id"], x["turn"]) for x in audit(r) if x["step"] > 3)  # noqa: E731
    assert turns(straight) and turns(straight) == turns(run)
    assert len(os.listdir(os.path.join(run, "audit"))) == after


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
    assert new[key].dtype == torch.bfloat16
    assert not torch.equal(new[key].float(), old[key].bfloat16().float())  # training moved the weights


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


def test_mpirun_launch_zero2_loss_truncation(tmp_path, tiny_model_path):
    if shutil.which("mpirun", path=env()["PATH"]) is None:
        pytest.fail("mpirun is not installed: pip install -r requirements-dev.txt (mpich)")
    launch("mpirun.sh", ["recipes/default.yaml", f"model.path={tiny_model_path}", "train.max_steps=2",
                         "train.zero_stage=2", "train.method=loss_truncation", "data.max_length=96",
                         f"output.dir={tmp_path}", "output.name=mpi"])
    rows = metrics(os.path.join(tmp_path, "mpi"))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["bucket_n"][0] > 0 for r in rows)
    assert os.path.exists(os.path.join(tmp_path, "mpi", "export", "model.safetensors"))


def test_slurm_script_single_node_zero0_sft(tmp_path, tiny_model_path):
    """slurm.sbatch on a one-node allocation: a local launch, no ssh needed. (Multi-node needs a
    second machine: the hostfile path is the DeepSpeed launcher's own.)"""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\n")
    (fake / "scontrol").chmod(0o755)
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "recipes/default.yaml",
         f"model.path={tiny_model_path}", "train.max_steps=2", "train.zero_stage=0", "train.method=sft",
         "data.max_length=96", "checkpoint.export=false", f"output.dir={tmp_path}", "output.name=slurm"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**env(), "PATH": f"{fake}{os.pathsep}{env()['PATH']}", "SLURM_JOB_NODELIST": "localhost",
             "SLURM_JOB_ID": "42", "GPUS_PER_NODE": "2"})
    assert out.returncode == 0, out.stderr[-5000:]
    assert "dist_world_size=2" in out.stdout + out.stderr  # the launcher logs to stdout
    rows = metrics(os.path.join(tmp_path, "slurm"))
    assert [r["step"] for r in rows] == [1, 2] and all(r["mean_weight"] == 1.0 for r in rows)
