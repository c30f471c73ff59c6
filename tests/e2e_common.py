"""Helpers of the end-to-end tests: launch the real scripts, read a run's outputs, compare runs."""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

PREPARED = os.path.join(ROOT, "runs", ".test-prepared")  # one prepare serves the module's runs
HOLDOUT = "0.005"  # the held-out fraction: ~36 dialogues, some 180 rows under split (a pass takes seconds)
COMMON = ["train.max_steps=6", "data.max_length=128", "train.micro_batch_size=2", "resure.min_count=4",
          "checkpoint.every=0", "output.report_to=tensorboard", f"data.prepared_dir={PREPARED}",
          f"data.eval={HOLDOUT}", "eval.every=3", "eval.micro_batch_size=32", "checkpoint.export_dtype=fp32",
          "model.dtype=fp32",  # the same arithmetic on every CPU (auto picks bf16 where AVX512-BF16 is)
          "output.plot=false", "output.report=false",  # seconds a run; the straight run (conftest) makes both
          # batches built in the training loop: a spawned loader worker per rank costs a launch about
          # 6 s of start-up on 2 cores. The straight run keeps the worker, so every run compared with
          # it also checks that the worker changes no batch.
          "data.num_workers=0"]
EXIT_RESUME = 75


def env():
    e = dict(os.environ)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e["PYTHON"] = sys.executable
    e["NUM_PROCS"] = "2"
    e.pop("MASTER_PORT", None)
    return e


def launch(script, args, timeout=600, extra_env=None, status=0):
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], cwd=ROOT,
                         env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=timeout)
    if status is not None:  # None: any status (the caller checks)
        assert out.returncode == status, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def assert_same_training(a_dir, b_dir, from_step=0, rel=1e-9):
    """Steps after from_step: the same losses, weights, statistics and validation; the same turns
    with the same weights in the audit."""
    a, b = metrics(a_dir), metrics(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a[from_step:], b[from_step:]):
        assert set(ra) == set(rb), ra["step"]
        for k in ("loss", "weighted_loss", "mean_weight", "frac_w_lt_1", "bucket_n", "bucket_mean", "bucket_std",
                  "lr", "val_loss", "val_depth_loss"):
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=rel, nan_ok=True), (ra["step"], k)
    wa = [(r["dialogue_id"], r["turn"], r["weight"], r["loss"]) for r in audit(a_dir) if r["step"] > from_step]
    wb = [(r["dialogue_id"], r["turn"], r["weight"], r["loss"]) for r in audit(b_dir) if r["step"] > from_step]
    assert wa and [x[:2] for x in wa] == [x[:2] for x in wb]  # the same turns, in the same steps
    for x, y in zip(wa, wb):
        assert x[2] == pytest.approx(y[2], rel=rel) and x[3] == pytest.approx(y[3], rel=rel)


def shm_buffers() -> set:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm (memory): a run must leave none behind."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"deepspeed_allreduce_buffer_{os.getuid()}_")}


def wait_for_a_step(proc: subprocess.Popen, run_dir, timeout: float = 300) -> None:
    """Until the launched run `proc` has logged its first step (a whole line of metrics.jsonl)."""
    path, deadline = os.path.join(run_dir, "metrics.jsonl"), time.monotonic() + timeout
    while not (os.path.exists(path) and "\n" in open(path, encoding="utf-8").read()):
        assert proc.poll() is None, "the run ended before its first step:\n" + proc.communicate()[1][-5000:]
        assert time.monotonic() < deadline, f"no step logged within {timeout:.0f} s"
        time.sleep(0.02)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(ln) for ln in f]


def audit(run_dir):
    from resure_ds.report.audit import read_audit

    return sorted(read_audit(run_dir).to_pylist(), key=lambda r: (r["step"], r["dialogue_id"], r["turn"]))
