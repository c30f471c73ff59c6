"""Size and build time of the data-quality report, its export and its filter, on a run with over
100,000 audited turns: 340 steps of the tiny 2-layer model of the tests (SmolLM2's tokenizer,
random weights) over the chitchat corpus, 2 ranks of 16 packed rows of 512 tokens (about 30
minutes on a 2-core CPU; about 305 turns a step, every dialogue seen 4-5 times).

    python benchmarks/report_scale.py                      # train the run, then measure
    python benchmarks/report_scale.py --run runs/NAME      # measure an existing run folder
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def train(out_dir: str, steps: int) -> str:
    from resure_ds.models import EMBEDDED, resolve_model_path
    from resure_ds.testing import random_llama

    model = os.path.join(out_dir, "tiny")
    if not os.path.exists(os.path.join(model, "config.json")):
        random_llama(resolve_model_path(EMBEDDED), model)
    env = {**os.environ, "NUM_PROCS": "2", "PYTHON": sys.executable,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    subprocess.run(["bash", os.path.join(ROOT, "launch", "train.sh"), "recipes/default.yaml", f"model.path={model}",
                    f"train.max_steps={steps}", "data.max_length=512", "train.micro_batch_size=16",
                    "checkpoint.every=0", "checkpoint.export=false", "output.report_to=none",
                    f"output.dir={out_dir}", "output.name=report-scale"], cwd=ROOT, env=env, check=True)
    return os.path.join(out_dir, "report-scale")


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def measure(run_dir: str, work: str) -> dict:
    from resure_ds.report.audit import read_audit, segments
    from resure_ds.report.build import write_report
    from resure_ds.report.verdict import export, filter_corpus

    _, t_report = timed(write_report, run_dir)
    turns, t_export = timed(export, run_dir, os.path.join(work, "verdict.parquet"))
    counts, t_filter = timed(filter_corpus, run_dir, os.path.join(work, "filtered"), 0.5)
    return {"run": run_dir, "audited_rows": read_audit(run_dir, columns=["step"]).num_rows, "distinct_turns": turns,
            "audit_bytes": sum(os.path.getsize(p) for p in segments(run_dir)),
            "report_bytes": os.path.getsize(os.path.join(run_dir, "report.html")),
            "report_s": round(t_report, 2), "export_s": round(t_export, 2), "filter_s": round(t_filter, 2),
            "filter_dropped": counts["dropped"], "filter_records": counts["records"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="an existing run folder (skips training)")
    ap.add_argument("--steps", type=int, default=340)
    ap.add_argument("--work", default=os.path.join(ROOT, "benchmarks", "work", "report_scale"))
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    run_dir = a.run or train(a.work, a.steps)
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        res = measure(run_dir, tmp)
    res["audit_bytes_per_row"] = round(res["audit_bytes"] / max(res["audited_rows"], 1), 1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
