"""Corpora at scale: prepare throughput and memory, launch and resume time, packing efficiency,
end-to-end throughput packed vs padded. Everything is measured side by side in one run.

    python benchmarks/corpus_scale.py                 # all parts (about 40 minutes on 2 CPU cores)
    python benchmarks/corpus_scale.py --parts render packing

The corpus: the embedded chitchat dialogues with an assistant turn (4,018), replicated with unique
ids into 32 Parquet shards, 301,350 dialogues (and 32,144 in 32 shards, for the memory
comparison), under benchmarks/work/. Results go to benchmarks/results/corpus_scale.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WORK = os.path.join(ROOT, "benchmarks", "work", "corpus_scale")
OUT = os.path.join(ROOT, "benchmarks", "results", "corpus_scale.json")
PY = sys.executable


def log(*a):
    print("[corpus_scale]", *a, file=sys.stderr, flush=True)


def base_dialogues():
    from resure_ds.data.records import read_dialogues

    return list(read_dialogues("chitchat", skip_invalid=True))


def build_corpus(folder: str, copies: int, shards: int = 32) -> int:
    """chitchat x copies, unique ids, OpenAI layout, in `shards` Parquet files (kept if present)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = os.path.join(folder, "DONE")
    if os.path.exists(done):
        return int(open(done).read())
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    base = base_dialogues()
    recs = [{"id": f"{d.dialogue_id}#{k}", "messages": d.messages} for k in range(copies) for d in base]
    per = math.ceil(len(recs) / shards)
    for s in range(shards):
        pq.write_table(pa.Table.from_pylist(recs[s * per:(s + 1) * per]), os.path.join(folder, f"part-{s:03d}.parquet"),
                       row_group_size=4096)
    with open(done, "w") as f:
        f.write(str(len(recs)))
    return len(recs)


# -- 1. rendering: today's per-prefix renderer vs the single rendering, one core ------------------
def old_render(r, d):
    """The previous release's renderer, from its code: every assistant turn renders its prefix
    twice (P_j, Q_j), each piece is a separate tokenizer call, turns past the cut are skipped."""
    import numpy as np

    full = r.template.render(d.messages, False)
    ids, turn, counts, prev = [], [], [], 0
    for t, (s, e) in enumerate(r.prefix_spans(d, full)):
        if len(ids) >= r.max_length:
            break
        head = r.tok(full[prev:s], add_special_tokens=False)["input_ids"] if s > prev else []
        body = r.tok(full[s:e], add_special_tokens=False)["input_ids"]
        ids += head + body
        turn += [-1] * len(head) + [t] * len(body)
        counts.append(len(body))
        prev = e
    else:
        tail = r.tok(full[prev:], add_special_tokens=False)["input_ids"] if full[prev:] else []
        ids, turn = ids + tail, turn + [-1] * len(tail)
    return np.asarray(ids[: r.max_length]), np.asarray(turn[: r.max_length])


def part_render(res: dict, trials: int = 3) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core, as one prepare worker has
    import statistics

    from resure_ds.data.render import Renderer
    from resure_ds.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("smollm2"))
    ds = base_dialogues()
    out = {}
    for L in (256, 1024):
        old, new = Renderer(tok, L), Renderer(tok, L)
        old.template.direct = None  # the previous release rendered through apply_chat_template
        new.render_many(ds[:500])  # a worker's layout cache warms on its first batches
        before, after = [], []
        for _ in range(trials):  # interleaved, so both see the same machine
            t = time.perf_counter()
            n_old = sum(len(old_render(old, d)[0]) for d in ds[:1000])
            before.append(n_old / (time.perf_counter() - t))
            t = time.perf_counter()
            exs = [e for i in range(0, len(ds), 256) for e in new.render_many(ds[i:i + 256]) if e is not None]
            dt = time.perf_counter() - t
            after.append(sum(len(e.input_ids) for e in exs) / dt)
        b, a = statistics.median(before), statistics.median(after)
        out[L] = {"before_tokens_per_s": before, "after_tokens_per_s": after, "after_dialogues_per_s": len(ds) / dt,
                  "median_speedup": a / b}
        log(f"render max_length {L}, one core, median of {trials}: before {b:,.0f} tok/s, after {a:,.0f} tok/s "
            f"({a / b:.1f}x); trials before {[round(x) for x in before]}, after {[round(x) for x in after]}")
    res["render_one_core"] = out


# -- 2. prepare: throughput with 1 and 2 workers, peak memory at 30k vs 300k -----------------------
def watch(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd from the repository root; its wall time, the peak RSS of its process tree and of its
    largest process (sampled every 0.2 s), its return code, stdout and stderr."""
    import tempfile

    import psutil

    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # a pipe would fill and block it
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True, env=env)
    proc, peak, peak_one = psutil.Process(p.pid), 0, 0
    while p.poll() is None:
        try:
            rss = [q.memory_info().rss for q in [proc] + proc.children(recursive=True)]
            peak, peak_one = max(peak, sum(rss)), max(peak_one, max(rss))
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    out.seek(0)
    err.seek(0)
    return {"wall_s": wall, "peak_rss_tree_mb": peak / 2 ** 20, "peak_rss_one_process_mb": peak_one / 2 ** 20,
            "rc": p.returncode, "stdout": out.read(), "stderr": err.read()}


def run_prepare(data: str, prepared: str, workers: int, max_length: int = 256) -> dict:
    """`python -m resure_ds.data.prepare` as a user runs it; wall time and peak RSS of its process tree."""
    shutil.rmtree(prepared, ignore_errors=True)
    cmd = [PY, "-m", "resure_ds.data.prepare", "recipes/default.yaml", f"data.train={data}",
           f"data.prepared_dir={prepared}", f"data.max_length={max_length}", f"data.prepare_workers={workers}"]
    w = watch(cmd)
    assert w["rc"] == 0, (cmd, w["stderr"][-2000:])
    folder = w["stdout"].strip().splitlines()[-1]
    m = json.load(open(os.path.join(folder, "manifest.json")))
    c = m["counts"]
    return {"workers": workers, "wall_s": w["wall_s"], "prepare_s": m["seconds"], "dialogues": c["dialogues"],
            "tokens": c["tokens"], "dialogues_per_s": c["dialogues"] / m["seconds"],
            "tokens_per_s": c["tokens"] / m["seconds"], "peak_rss_tree_mb": w["peak_rss_tree_mb"],
            "peak_rss_one_process_mb": w["peak_rss_one_process_mb"], "folder": folder}


def part_prepare(res: dict) -> None:
    big = os.path.join(WORK, "corpus-300k")
    small = os.path.join(WORK, "corpus-32k")
    n_big, n_small = build_corpus(big, 75), build_corpus(small, 8)  # 301,350 and 32,144 dialogues
    res["corpus"] = {"dialogues_big": n_big, "dialogues_small": n_small, "shards": 32}
    out = {}
    for name, data, w in (("300k_1worker", big, 1), ("300k_2workers", big, 2), ("32k_2workers", small, 2)):
        r = run_prepare(data, os.path.join(WORK, f"prep-{name}"), w)
        out[name] = r
        log(f"prepare {name}: {r['dialogues']:,} dialogues in {r['prepare_s']:.0f} s, {r['dialogues_per_s']:,.0f} "
            f"dialogues/s, {r['tokens_per_s']:,.0f} tokens/s; peak RSS {r['peak_rss_tree_mb']:.0f} MB (tree), "
            f"{r['peak_rss_one_process_mb']:.0f} MB (largest process)")
    t = time.perf_counter()
    hit = subprocess.run([PY, "-m", "resure_ds.data.prepare", "recipes/default.yaml", f"data.train={big}",
                          f"data.prepared_dir={os.path.join(WORK, 'prep-300k_2workers')}"], cwd=ROOT,
                         capture_output=True, text=True)
    out["cache_hit_s"] = time.perf_counter() - t
    assert "cache hit" in hit.stderr
    log(f"prepare again, unchanged: cache hit in {out['cache_hit_s']:.1f} s")
    res["prepare"] = out


# -- 3. launch to first step, resume at 0% / 90% of an epoch ---------------------------------------
def launch_until_step(args: list[str], run_dir: str, step: int) -> tuple[float, dict]:
    """Seconds from `bash launch/train.sh` to the given step in metrics.jsonl, and that row
    (with the run's own startup split, parsed from its log, under 'startup')."""
    env = {**os.environ, "PATH": os.path.dirname(PY) + os.pathsep + os.environ["PATH"], "PYTHON": PY}
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    logf = open(run_dir + ".log", "w")
    t0 = time.perf_counter()
    p = subprocess.Popen(["bash", "launch/train.sh", *args], cwd=ROOT, env=env, stdout=logf, stderr=logf)
    path = os.path.join(run_dir, "metrics.jsonl")
    row = None
    while row is None:
        if os.path.exists(path):
            rows = [json.loads(x) for x in open(path) if x.strip()]
            row = next((r for r in rows if r["step"] == step), None)
        if p.poll() is not None and row is None:
            raise RuntimeError(f"launch ended ({p.returncode}) before step {step}: {args}")
        time.sleep(0.05)
    dt = time.perf_counter() - t0
    p.wait()
    logf.close()
    line = next((x for x in open(run_dir + ".log") if "startup (s):" in x), "")
    row["startup"] = {k: float(v) for k, v in (kv.split() for kv in line.split("startup (s):")[-1].split(";")[0]
                                              .split(",") if kv.strip())}
    return dt, row


def part_resume(res: dict) -> None:
    from resure_ds.data.order import Plan
    from resure_ds.data.shards import PreparedSource

    data = os.path.join(WORK, "corpus-300k")
    prep = os.path.join(WORK, "prep-300k_2workers")
    build_corpus(data, 75)
    subprocess.run([PY, "-m", "resure_ds.data.prepare", "recipes/default.yaml", f"data.train={data}",
                    f"data.prepared_dir={prep}"], cwd=ROOT, check=True, capture_output=True)  # not timed
    out_dir = os.path.join(WORK, "runs")
    shutil.rmtree(out_dir, ignore_errors=True)
    common = ["recipes/default.yaml", f"data.train={data}", f"data.prepared_dir={prep}", f"output.dir={out_dir}",
              "train.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=1", "checkpoint.export=false",
              "output.plot=false", "output.report=false"]
    first, row = launch_until_step([*common, "output.name=launch", "train.stop_after=1"],
                                   os.path.join(out_dir, "launch"), 1)
    out = {"launch_to_first_step_s": first, "first_step_time_s": row["step_time_s"], "startup": row["startup"],
           "first_step_data_wait_s": row["data_wait_s"]}
    log(f"launch to first optimizer step: {first:.1f} s (the step itself {row['step_time_s']:.1f} s, of which "
        f"{row['data_wait_s']:.1f} s waiting for the first batch); rank 0 startup (s): {row['startup']}")
    # The data position of a checkpoint is a global cursor: move it to 90% of the epoch and resume.
    folder = json.load(open(os.path.join(out_dir, "launch", "checkpoints", "step0000001", "progress.json")))
    folder = next(f for f in os.listdir(prep) if f.endswith(folder["data"][0]["key"]))
    plan = Plan([PreparedSource(os.path.join(prep, folder)).lengths], [1.0], 1234, 256, True, 8192)
    ckpt = os.path.join(out_dir, "launch", "checkpoints", "step0000001", "progress.json")
    progress = json.load(open(ckpt))
    for name, frac in (("resume_at_0pct", 0.0), ("resume_at_90pct", 0.9)):
        shutil.copytree(os.path.join(out_dir, "launch"), os.path.join(out_dir, name))
        w = int(frac * plan.windows_per_epoch)
        p = dict(progress, cursor={"epoch": 0, "window": w, "row": 0, "rows_seen": w * 8192})
        json.dump(p, open(os.path.join(out_dir, name, "checkpoints", "step0000001", "progress.json"), "w"))
        dt, row = launch_until_step([*common, f"output.name={name}", "train.stop_after=2"],
                                    os.path.join(out_dir, name), 2)
        out[name] = {"launch_to_step_s": dt, "step_time_s": row["step_time_s"], "window": w,
                     "windows_per_epoch": plan.windows_per_epoch, "rows_seen": row["rows_seen"],
                     "startup": row["startup"], "first_step_data_wait_s": row["data_wait_s"]}
        log(f"{name}: launch to the first resumed step {dt:.1f} s (the step itself {row['step_time_s']:.1f} s, "
            f"{row['data_wait_s']:.1f} s of it waiting for the first batch; window {w} of {plan.windows_per_epoch}); "
            f"rank 0 startup (s): {row['startup']}")
    # The data side alone, in process: first batch at a cursor, as a rank's loader does it.
    from resure_ds.data.loader import RankBatches, Stream
    from resure_ds.data.order import Cursor

    for frac in (0.0, 0.5, 0.9):
        w = int(frac * plan.windows_per_epoch)
        t = time.perf_counter()
        next(iter(RankBatches(Stream([os.path.join(prep, folder)], [1.0], 1234, 256, True, 8192, 2, 2), 0, 2,
                              Cursor(0, w, 100, w * 8192 + 100))))
        out[f"data_first_batch_at_{int(frac * 100)}pct_s"] = time.perf_counter() - t
        log(f"first batch at {frac:.0%} of the epoch (open 32 shards, permutation, one window): "
            f"{time.perf_counter() - t:.2f} s")
    res["resume"] = out


# -- 4. packing efficiency vs padding ------------------------------------------------------------
def part_packing(res: dict) -> None:

    from resure_ds.config import load_config
    from resure_ds.data.order import Plan
    from resure_ds.data.shards import PreparedSource
    from resure_ds.models import load_tokenizer, resolve_model_path
    from resure_ds.data.prepare import ensure_prepared

    model = resolve_model_path("smollm2")
    tok = load_tokenizer(model)
    out = {}
    for L in (512, 1024, 2048):
        cfg = load_config("recipes/default.yaml", [f"data.max_length={L}", f"data.prepared_dir={WORK}/prep-chitchat"])
        [p] = ensure_prepared(cfg, tok, model, progress=False)
        lengths = PreparedSource(p.folder).lengths
        packed = Plan([lengths], [1.0], 1234, L, True, 8192)
        rows = [r for w in range(packed.windows_per_epoch) for r in packed.window_rows(0, w)]
        pack_eff = lengths.sum() / (len(rows) * L)
        order = Plan([lengths], [1.0], 1234, L, False, 8192).epoch_order(0)
        mb = 8  # the padded path: batches of 8 dialogues padded to their longest
        padded = sum(lengths[order[i:i + mb]].max() * len(order[i:i + mb]) for i in range(0, len(order), mb))
        out[L] = {"packing": float(pack_eff), "padding": float(lengths.sum() / padded), "rows": len(rows),
                  "dialogues": len(lengths), "mean_dialogues_per_row": len(lengths) / len(rows)}
        log(f"max_length {L}: packed rows {pack_eff:.1%} full, padded batches of 8 {out[L]['padding']:.1%} "
            f"({out[L]['mean_dialogues_per_row']:.1f} dialogues per packed row)")
    res["packing"] = out


# -- 5. end to end: the default recipe, packed vs padded -----------------------------------------
def part_end_to_end(res: dict, steps: int = 8) -> None:
    out_dir = os.path.join(WORK, "runs-e2e")
    shutil.rmtree(out_dir, ignore_errors=True)
    out = {}
    for name, packing in (("padded", "false"), ("packed", "true")):
        args = ["recipes/default.yaml", "data.max_length=1024", f"data.packing={packing}",
                f"data.prepared_dir={WORK}/prep-chitchat", f"train.max_steps={steps}", "checkpoint.keep_last=0",
                "checkpoint.export=false", "output.plot=false", "output.report=false", f"output.dir={out_dir}", f"output.name={name}"]
        launch_until_step(args, os.path.join(out_dir, name), steps)
        rows = [json.loads(x) for x in open(os.path.join(out_dir, name, "metrics.jsonl"))][1:]  # skip warm-up step
        real = sum(r["tokens_per_s"] * r["step_time_s"] for r in rows)
        secs = sum(r["step_time_s"] for r in rows)
        out[name] = {"real_tokens_per_s": real / secs, "step_time_s": secs / len(rows), "steps": len(rows),
                     "trained_tokens_per_step": sum(r["trained_tokens"] for r in rows) / len(rows)}
        log(f"end to end, max_length 1024, {name}: {real / secs:,.1f} real tokens/s, {secs / len(rows):.1f} s a step")
    out["ratio"] = out["packed"]["real_tokens_per_s"] / out["padded"]["real_tokens_per_s"]
    log(f"packed / padded real tokens/s: {out['ratio']:.2f}x")
    res["end_to_end_1024"] = out


PARTS = {"render": part_render, "prepare": part_prepare, "resume": part_resume, "packing": part_packing,
         "end_to_end": part_end_to_end}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS))
    a = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    res = json.load(open(OUT)) if os.path.exists(OUT) else {}
    res["machine"] = f"{os.cpu_count()} CPU cores, {sys.platform}"
    for part in a.parts:
        PARTS[part](res)
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(OUT, "w") as f:
            json.dump(res, f, indent=2, default=float)
    log(f"results: {OUT}")


if __name__ == "__main__":
    main()
