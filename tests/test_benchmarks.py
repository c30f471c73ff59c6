"""The benchmark scripts run on the current API (tiny shapes; the numbers are the scripts' job)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run(*args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_loss_overhead_runs():
    out = run("benchmarks/loss_overhead.py", "--B", "2", "--S", "64", "--V", "300", "--repeats", "1")
    assert out.count("ratio") == 2


def test_stats_sync_runs_on_two_ranks():
    out = run("benchmarks/stats_sync.py", "--ranks", "2", "--turns", "16", "--repeats", "2")
    assert "2 ranks (cpu)" in out and "ratio" in out


@pytest.mark.slow
def test_signals_cost_runs_every_row_on_two_ranks():
    """benchmarks/signals_cost.py on 2 gloo ranks: every row measured, the paper's rule the unit, and
    more sources hand more bytes to the collectives (their per-source statistics)."""
    out = run("benchmarks/signals_cost.py", "--ranks", "2", "--turns", "8", "--repeats", "1")
    rows = [ln.split(" | ") for ln in out.splitlines() if ln.startswith("| [loss")]
    assert len(rows) == 8, out
    assert rows[0][2] == "1.00"
    sent = [int(r[3].rstrip(" |").replace(",", "")) for r in rows]
    assert all(b > 0 for b in sent) and sent[2] < sent[4] < sent[6], out


def test_loss_memory_runs_and_records(tmp_path):
    res = tmp_path / "loss_memory.json"
    out = run("benchmarks/loss_memory.py", "--batch", "2", "--seq", "256", "--hidden", "32", "--vocab", "20000",
              "--repeats", "1", f"--results={res}")
    assert "fused / logits" in out
    (entry,) = json.loads(res.read_text()).values()
    assert set(entry["results"]) == {"fused", "logits"}
    # 2 x 256 x 20,000 fp32 logits are 39 MiB, and their gradient as much again: the fused path holds neither
    assert entry["results"]["fused"]["peak_bytes"] < entry["results"]["logits"]["peak_bytes"]


@pytest.mark.long
def test_gpu_bench_dry_run_on_cpu(tmp_path, smollm2_path):
    """benchmarks/gpu/bench.py with a 2-layer model on CPU, three of its rows: the plain loop with
    attention per dialogue, the recipe at ZeRO-3 with its tuned settings, and TRL (not installed in
    the suite's environment: a failed row, recorded, and the script goes on). Each row's result
    lands in bench.jsonl as it finishes; the table and bench.json come at the end."""
    rows = ["plain-varlen", "trl", "recipe-z3-tuned"]
    out = subprocess.run([sys.executable, "benchmarks/gpu/bench.py", "--tiny", "--dtype=fp32", "--steps=2",
                          "--warmup=1", "--length=128", "--rows=2", "--only", *rows, f"--out={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ROOT, "RESURE_GPU_TOKENIZER": smollm2_path,
                              "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    lines = [json.loads(ln) for ln in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert [r["row"] for r in lines] == rows
    res = json.loads((tmp_path / "bench.json").read_text())["results"]
    for name in ("plain-varlen", "recipe-z3-tuned"):
        assert res[name]["status"] == "ok" and res[name]["tokens_per_s"] > 0 and res[name]["params"] > 0, res[name]
    assert res["recipe-z3-tuned"]["split"]["time_forward_s"] > 0
    log = (tmp_path / "rows" / "recipe-z3-tuned.log").read_text()
    assert "ZeRO-3" in log and "ds_tuned.json" in log
    assert "Self CPU" in (tmp_path / "rows" / "recipe-z3-tuned.profile.txt").read_text()
    try:
        import trl  # noqa: F401
        assert res["trl"]["status"] == "ok"
    except ImportError:
        assert res["trl"]["status"] == "failed" and "trl" in res["trl"]["why"]
    table = (tmp_path / "bench.txt").read_text()
    assert "plain-varlen" in table and "recipe-z3-tuned" in table and "trl" in table


@pytest.mark.long
def test_report_scale_measures_a_run(tmp_path, straight):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir, ignore=shutil.ignore_patterns("checkpoints", "export", "best"))
    res = json.loads(run("benchmarks/report_scale.py", f"--run={run_dir}", f"--work={tmp_path}"))
    assert res["audited_rows"] == sum(r["turns"] for r in map(json.loads, open(run_dir / "metrics.jsonl")))
    assert 0 < res["distinct_turns"] <= res["audited_rows"] and res["report_bytes"] > 10_000
    assert res["filter_records"] == 7168  # the whole embedded corpus, read and written back


def test_overflow_benchmark_accounts_for_every_turn(tmp_path):
    """benchmarks/overflow.py on 40 real dialogues at 96 tokens: each policy's turns trained whole,
    partially and never add up to the turns of the whole renderings; split never loses one."""
    from tests.test_prepare import chitchat_jsonl

    chitchat_jsonl(tmp_path / "data", n_files=1, per_file=40)
    # the JSON from its file: on a cold cache, converting the embedded model logs to stdout (DeepSpeed's warning)
    out = subprocess.run([sys.executable, "benchmarks/overflow.py", f"--data={tmp_path / 'data'}", "--max-length=96",
                          "--workers=1", f"--results={tmp_path / 'overflow.json'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads((tmp_path / "overflow.json").read_text())
    res = {r["policy"]: r for r in got["results"]}
    for r in res.values():
        assert r["turns_whole"] + r["turns_partial"] + r["turns_not_trained"] == got["turns"]
    assert res["split"]["turns_not_trained"] == 0 < res["cut"]["turns_not_trained"]
    assert res["drop"]["dialogues"] < res["cut"]["dialogues"] <= res["split"]["dialogues"] < res["split"]["rows"]


@pytest.mark.long
def test_sequence_parallel_benchmark_runs_both_ways(tmp_path):
    """benchmarks/sequence_parallel.py at 256 tokens on 2 gloo ranks: SP=1 and SP=2 each record a
    peak and a speed, and the longest row within the budget."""
    res = tmp_path / "sp.json"
    run("benchmarks/sequence_parallel.py", "--lengths", "256", "--steps", "2", "--budget-mib", "100000",
        f"--results={res}")
    out = json.loads(res.read_text())
    assert [(r["sp"], r["length"]) for r in out["results"]] == [(1, 256), (2, 256)]
    assert all(r["peak_mib_per_rank"] >= 0 and r["tokens_per_s"] > 0 for r in out["results"])
    assert out["longest_within_budget"] == {"1": 256, "2": 256}


@pytest.mark.long
def test_plan_memory_measures_a_run_beside_the_plan(tmp_path, tiny_model_path):
    out = tmp_path / "plan_memory.json"
    run("benchmarks/plan_memory.py", f"--model={tiny_model_path}", "--settings=1x64", "--steps=1", f"--results={out}")
    [r] = json.loads(out.read_text())["results"]
    assert r["measured_peak_mib"] > 0 and r["plan_buffers_mib"] > 0 and r["measured_over_plan"] > 0
    parts = r["plan_states_mib"] + r["plan_buffers_mib"] + r["plan_activations_mib"]
    assert abs(r["plan_mib"] - parts) <= 2  # each part rounded on its own


def test_throughput_refuses_counts_that_would_time_nothing():
    for arg in ("--repeats=0", "--steps=0", "--repeats=-2"):
        out = subprocess.run([sys.executable, "benchmarks/throughput.py", arg, "--only", "plain"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "must be at least 1" in out.stderr, (arg, out.stderr[-500:])



@pytest.mark.long
def test_startup_times_every_phase_of_a_launch(tmp_path, tiny_model_path):
    """benchmarks/startup.py on the tiny model: the trace finds every mark of launch/train.sh in
    order, and the rank's own timers and first step fit after its Python started."""
    from tests.e2e_common import PREPARED

    res = tmp_path / "startup.json"
    run("benchmarks/startup.py", "--repeats=1", f"--json={res}", f"model.path={tiny_model_path}",
        "data.max_length=128", f"data.prepared_dir={PREPARED}", "model.dtype=fp32", "data.num_workers=0")
    [row] = json.loads(res.read_text())["warm"]
    phases = ("before_script", "script", "port", "prepare", "launcher", "rank_imports", "group_model_tokenizer",
              "data", "engine", "resume", "first_step")
    assert all(row[k] >= 0 for k in phases) and row["first_step"] > 0, row
    assert row["prepare"] > 0 and row["launcher"] > 0 and row["engine"] > 0
