"""The report's read of metrics.jsonl on a long run: every row held as a dict (how the report read it
before) against run_files.read_report_metrics (the rows the plots draw, the validations, the last
five), side by side: time and peak memory, each in a process of its own.

    python benchmarks/report_metrics.py                       # 163,656 rows, a row like the default run's
    python benchmarks/report_metrics.py --rows 1000000 --like runs/default/metrics.jsonl

--like takes the last row of a real run's metrics.jsonl as the row to repeat (steps renumbered; a
validation every 100 steps).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = {"step": 1, "loss": 3.6, "weighted_loss": 3.5, "lr": 4e-5, "grad_norm": 1.9, "mean_weight": 0.99,
       "frac_w_lt_1": 0.04, "frac_w_lt_0.5": 0.01, "turns": 14, "trained_tokens": 610, "skipped_step": False,
       "bucket_mean": [3.1, 3.4, 3.6, 3.7], "bucket_std": [0.9, 0.8, 0.8, 0.7], "bucket_n": [210, 180, 150, 300],
       "step_time_s": 6.1, "tok_s": 160.0, "nonfinite_total": 0, "time_forward_s": 2.0, "time_backward_s": 3.5,
       "time_optimizer_s": 0.4, "time_stats_s": 0.01, "time_data_s": 0.01, "stop_signal": 0.0, "stop_time": 0.0}
PROBE = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from resure_ds.report.run_files import read_report_metrics
t0 = time.perf_counter()
if sys.argv[3] == "whole":
    with open(sys.argv[2] + "/metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    kept = len(rows)
else:
    m = read_report_metrics(sys.argv[2])
    kept = len(m.rows) + len(m.val) + len(m.last)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rows_held": kept}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=163_656)
    ap.add_argument("--like", help="a run's metrics.jsonl: its last row is repeated")
    a = ap.parse_args()
    row = dict(ROW)
    if a.like:
        with open(a.like, encoding="utf-8") as f:
            row = json.loads([ln for ln in f if ln.strip()][-1])
    with tempfile.TemporaryDirectory(prefix="report-metrics-") as run:
        with open(os.path.join(run, "metrics.jsonl"), "w", encoding="utf-8") as f:
            val = {"val_loss": 2.0, "val_turn_loss": 2.1, "val_depth_loss": [2.0] * 4, "val_dialogues": 64}
            for s in range(1, a.rows + 1):
                f.write(json.dumps({**row, "step": s, **(val if s % 100 == 0 else {})}) + "\n")
        size = os.path.getsize(os.path.join(run, "metrics.jsonl"))
        res = {"rows": a.rows, "keys_per_row": len(row), "file_mb": round(size / 1e6, 1)}
        for how in ("whole", "report"):
            out = subprocess.run([sys.executable, "-c", PROBE, ROOT, run, how], capture_output=True, text=True, check=True)
            res[how] = {k: round(v, 2) for k, v in json.loads(out.stdout).items()}
        res["peak_ratio_whole_over_report"] = round(res["whole"]["peak_mb"] / res["report"]["peak_mb"], 1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
