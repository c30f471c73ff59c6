"""Start-up of the embedded default: `bash launch/train.sh` until its first step is logged, phase
by phase, warm (caches filled by an unmeasured run first) and, with --cold, cold (a fresh
RESURE_CACHE and TORCH_EXTENSIONS_DIR each time: the model converted, the data prepared and
DeepSpeed's C++ op built again; the file-system cache is not dropped).

    python benchmarks/startup.py                  # warm, 3 measured launches
    python benchmarks/startup.py --cold --repeats 1
    python benchmarks/startup.py --repeats 1 model.path=/path/to/model   # other settings: key=value

The phases come from the scripts' trace (BASH_ENV sets a clock in PS4 and set -x in every bash
of the chain), the rank's own "startup (s)" line and the first row of metrics.jsonl (its
step_time_s):
  script          the outer script until its port probe (common.sh; NUM_PROCS, how many ranks)
  port            a free port for the rendezvous
  prepare         the recipe checked, the model converted, the data prepared (a cache hit when warm)
  launcher        the per-node launcher (resure_ds/node.py, or DeepSpeed's), until the first rank's
                  shell starts Python
  rank_imports    the rank's Python and imports, until its recipe starts (the remainder: first
                  step logged - everything else)
  group_model_tokenizer, data, engine, resume: inside the rank (train.py's timers)
  first_step      the first step itself
The launch is stopped once the first step is logged (no checkpoint or export is timed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE = "PS4='+@${EPOCHREALTIME}@ '; set -x\n"  # bash reads PS4 from a file, not (as root) from the environment
MARKS = (("script", r"^set -euo pipefail"), ("port", r"import socket"), ("prepare", r"-m resure_ds\.data\.prepare"),
         ("launcher", r"^exec \S*(deepspeed|python\S* -u -m (deepspeed|resure_ds\.node))"), ("rank_imports", r"-m resure_ds\.train"))
RANK_PHASES = ("group_model_tokenizer", "data", "engine", "resume")


def launch_once(work: str, name: str, env: dict, timeout: float, overrides: list[str]) -> dict:
    """One launch until its first metrics row: the seconds of each phase."""
    run = os.path.join(work, "runs", name)
    cmd = ["bash", os.path.join(ROOT, "launch", "train.sh"), "train.max_steps=2", *overrides,
           f"output.dir={work}/runs", f"output.name={name}", "output.report=false", "output.report_to=none",
           "checkpoint.resume=none"]
    trace: list[tuple[float, str]] = []
    lines: list[str] = []
    t0 = time.time()
    bash_env = os.path.join(work, "trace.sh")
    with open(bash_env, "w", encoding="utf-8") as f:
        f.write(TRACE)
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, "BASH_ENV": bash_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)

    def read_trace():
        for ln in proc.stderr:
            m = re.match(r"^\++@([0-9.]+)@ (.*)", ln)
            if m:
                trace.append((float(m.group(1)), m.group(2)))
            else:
                lines.append(ln)

    def read_out():
        lines.extend(proc.stdout)

    readers = [threading.Thread(target=read_trace, daemon=True), threading.Thread(target=read_out, daemon=True)]
    for r in readers:
        r.start()
    metrics = os.path.join(run, "metrics.jsonl")
    first = None
    try:
        while first is None:
            if time.time() - t0 > timeout:
                raise SystemExit(f"no step logged within {timeout:.0f} s:\n" + "".join(lines[-30:]))
            if proc.poll() is not None:
                raise SystemExit(f"the launch ended (exit {proc.returncode}) before its first step:\n"
                                 + "".join(lines[-30:]))
            if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
                with open(metrics, encoding="utf-8") as f:
                    row = f.readline()
                if row.endswith("\n"):
                    first = (time.time(), json.loads(row))
            time.sleep(0.02)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing after the first step is measured
        except ProcessLookupError:
            pass  # it had ended: the error above says how
        proc.wait()
    for r in readers:
        r.join(timeout=5)
    t_logged, row = first
    starts = {}
    for phase, needle in MARKS:
        hit = [t for t, text in trace if re.search(needle, text)]
        if not hit:
            raise SystemExit(f"the trace has no line with {needle!r}: is launch/train.sh changed?")
        starts[phase] = hit[0]
    out, order = {}, [p for p, _ in MARKS]
    for a, b in zip(order, order[1:]):
        out[a] = starts[b] - starts[a]
    said = next((ln for ln in lines if "startup (s):" in ln), None)
    if said is None:
        raise SystemExit("the rank printed no 'startup (s):' line")
    rank = {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+)", said.split("startup (s):", 1)[1])}
    out["before_script"] = next(t for t, _ in trace) - t0
    out["first_step"] = row["step_time_s"]
    out.update({k: rank.get(k, 0.0) for k in RANK_PHASES})
    out["rank_imports"] = (t_logged - starts["rank_imports"] - out["first_step"]
                           - sum(rank.get(k, 0.0) for k in RANK_PHASES))
    out["to_first_step_logged"] = t_logged - t0
    out["start_up"] = out["to_first_step_logged"] - out["first_step"]
    return out


def table(rows: list[dict], label: str) -> str:
    keys = ["before_script", *[p for p, _ in MARKS], *RANK_PHASES, "first_step", "start_up", "to_first_step_logged"]
    lines = [f"| phase ({label}, {len(rows)} launches) | median s | min s | max s |", "| --- | --- | --- | --- |"]
    for k in keys:
        v = [r[k] for r in rows]
        lines.append(f"| {k} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="also measure cold launches (fresh caches)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="settings for every launch")
    a = ap.parse_args()
    if a.repeats < 1:
        ap.error("--repeats must be 1 or more")
    own = ("MASTER_PORT", "MASTER_ADDR", "NUM_PROCS", "LAUNCHER_ARGS", "HOSTFILE", "NODE_RANK", "RANK", "LOCAL_RANK",
           "WORLD_SIZE")  # the default single-node launch, whatever the caller's shell holds
    env = {**{k: v for k, v in os.environ.items() if k not in own}, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHON": sys.executable}
    results = {}
    with tempfile.TemporaryDirectory(prefix="startup-") as work:
        if a.cold:
            cold = []
            for i in range(a.repeats):
                fresh = os.path.join(work, f"cold{i}")
                cold.append(launch_once(work, f"cold{i}", {**env, "RESURE_CACHE": fresh + "/cache",
                                                           "TORCH_EXTENSIONS_DIR": fresh + "/ext"}, a.timeout, a.overrides))
                shutil.rmtree(fresh, ignore_errors=True)
                print(json.dumps({"cold": i, **{k: round(v, 2) for k, v in cold[-1].items()}}), flush=True)
            results["cold"] = cold
        launch_once(work, "fill", env, a.timeout, a.overrides)  # the caches of this machine's environment, filled
        warm = []
        for i in range(a.repeats):
            warm.append(launch_once(work, f"warm{i}", env, a.timeout, a.overrides))
            print(json.dumps({"warm": i, **{k: round(v, 2) for k, v in warm[-1].items()}}), flush=True)
        results["warm"] = warm
    for label, rows in results.items():
        print(table(rows, label))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
