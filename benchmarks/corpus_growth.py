"""How the data path's costs grow with the corpus: 30k, 300k and 3M dialogues, measured the same way at
each size in one run.

    python benchmarks/corpus_growth.py                        # 30k, 300k, 3M (hours on 2 CPU cores)
    python benchmarks/corpus_growth.py --sizes 30000 300000

Per size: the corpus (the embedded chitchat dialogues with an assistant turn, replicated with unique
ids into Parquet files of about 10,000 dialogues); prepare with 2 workers (wall time, dialogues/s,
peak memory of the process tree and of its largest process); the prepared bytes; the launch check
of the prepared shards three ways (every SHA-256, as the first launch on a node does; incremental,
as every later launch does; sizes only, as each rank does); the prepare command's cache hit (what
launch/train.sh spends on data before the ranks start); and a rank's first batch at 90% of the
epoch (open the shards, one permutation, one window).

--parts verdict measures the commands on a run's results at each size: a run folder over the corpus
as one epoch of training would leave it (config.json and sources.json as a run writes them, one audit
row per assistant turn in rank segments of the writer's size, one metrics line per step of 305 turns,
as benchmarks/report_scale.py's real run trained), its values drawn at random (about 10% of turns
below weight 1); then, as a user runs them, the report (summary, plot, report.html), --export and
--filter --min-weight 0.5: wall time, peak memory, audit bytes per turn. Results:
benchmarks/results/corpus_growth.json (each size's entries updated as they finish).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.corpus_scale import PY, base_dialogues, run_prepare, watch  # noqa: E402

WORK = os.path.join(ROOT, "benchmarks", "work", "corpus_growth")
OUT = os.path.join(ROOT, "benchmarks", "results", "corpus_growth.json")
PER_FILE = 10_000
TURNS_PER_STEP = 305  # benchmarks/report_scale.py's run: 2 ranks of 16 packed rows of 512 tokens


def log(*a):
    print("[corpus_growth]", *a, file=sys.stderr, flush=True)


def build(folder: str, n: int) -> int:
    """n dialogues (chitchat replicated, unique ids) in Parquet files of PER_FILE, written one at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = os.path.join(folder, "DONE")
    if os.path.exists(done):
        return int(open(done).read())
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    base = [(d.dialogue_id, d.messages) for d in base_dialogues()]
    for f in range(math.ceil(n / PER_FILE)):
        recs = [{"id": f"{base[i % len(base)][0]}#{i // len(base)}", "messages": base[i % len(base)][1]}
                for i in range(f * PER_FILE, min(n, (f + 1) * PER_FILE))]
        pq.write_table(pa.Table.from_pylist(recs), os.path.join(folder, f"part-{f:05d}.parquet"), row_group_size=4096)
    with open(done, "w") as fh:
        fh.write(str(n))
    return n


def launch_checks(folder: str) -> dict:
    from resure_ds.data.manifest import VERIFIED, read_manifest, verify_shards

    m = read_manifest(folder)
    out = {"shards": len(m["shards"]), "prepared_bytes": sum(s["bytes"] for s in m["shards"])}
    stamps = os.path.join(folder, VERIFIED)
    if os.path.exists(stamps):
        os.remove(stamps)
    for name, checksums in (("check_full_sha256_s", True), ("check_incremental_s", True), ("check_sizes_s", False)):
        t = time.perf_counter()
        verify_shards(folder, m, checksums)
        out[name] = time.perf_counter() - t
    return out


def cache_hit(data: str, prepared: str) -> float:
    t = time.perf_counter()
    hit = subprocess.run([PY, "-m", "resure_ds.data.prepare", "recipes/default.yaml", f"data.train={data}",
                          f"data.prepared_dir={prepared}", "data.max_length=256"], cwd=ROOT, capture_output=True,
                         text=True)
    assert hit.returncode == 0 and "cache hit" in hit.stderr, hit.stderr[-2000:]
    return time.perf_counter() - t


def first_batch_at(folder: str, frac: float) -> float:
    from resure_ds.data.loader import RankBatches, Stream
    from resure_ds.data.order import Cursor, Plan
    from resure_ds.data.shards import PreparedSource

    t = time.perf_counter()
    plan = Plan([PreparedSource(folder).lengths], [1.0], 1234, 256, True, 8192)
    w = int(frac * plan.windows_per_epoch)
    next(iter(RankBatches(Stream([folder], [1.0], 1234, 256, True, 8192, 2, 2), 0, 2,
                          Cursor(0, w, 100, w * 8192 + 100))))
    return time.perf_counter() - t


def measure(n: int) -> dict:
    data = os.path.join(WORK, f"corpus-{n}")
    prepared = os.path.join(WORK, f"prep-{n}")
    t = time.perf_counter()
    build(data, n)
    res = {"dialogues": n, "files": math.ceil(n / PER_FILE), "build_s": time.perf_counter() - t}
    r = run_prepare(data, prepared, 2)
    res["prepare"] = {k: v for k, v in r.items() if k != "folder"}
    log(f"{n:,}: prepare {r['prepare_s']:.0f} s ({r['dialogues_per_s']:,.0f} dialogues/s), peak RSS "
        f"{r['peak_rss_tree_mb']:.0f} MB tree, {r['peak_rss_one_process_mb']:.0f} MB largest process")
    res["launch_check"] = launch_checks(r["folder"])
    c = res["launch_check"]
    log(f"{n:,}: {c['shards']} shards, {c['prepared_bytes'] / 2**20:,.0f} MiB; launch check: every SHA-256 "
        f"{c['check_full_sha256_s']:.2f} s, incremental {c['check_incremental_s']:.3f} s, sizes "
        f"{c['check_sizes_s']:.3f} s")
    res["cache_hit_s"] = cache_hit(data, prepared)
    res["first_batch_at_90pct_s"] = first_batch_at(r["folder"], 0.9)
    log(f"{n:,}: prepare command on a cache hit {res['cache_hit_s']:.1f} s; first batch at 90% of the epoch "
        f"{res['first_batch_at_90pct_s']:.2f} s")
    return res


# -- the commands on a run's results -----------------------------------------------------------------
def synth_run(data: str, run: str) -> dict:
    """A run folder over the corpus in `data` as one epoch would leave it (see the module's doc)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from resure_ds.config import load_config, to_dict
    from resure_ds.config.parse import train_specs
    from resure_ds.data.sources import resolve, source_fingerprint
    from resure_ds.report.audit import FLUSH_ROWS, SCHEMA, _write
    from resure_ds.report.run_files import write_sources

    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(os.path.join(run, "audit"))
    cfg = to_dict(load_config("recipes/default.yaml", [f"data.train={data}", "data.max_length=256"]))
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    spec = train_specs(cfg["data"])[0]
    write_sources(run, [{"name": spec.label, "files": source_fingerprint(resolve(spec))}])
    rng, turns, segs = np.random.default_rng(0), 0, [0, 0]
    pending: list[pa.Table] = []

    def flush(final: bool = False) -> None:
        t = pa.concat_tables(pending) if pending else None
        pending.clear()
        while t is not None and (t.num_rows >= 2 * FLUSH_ROWS or (final and t.num_rows)):
            for rank in (0, 1):  # each rank's rows, in training order, FLUSH_ROWS a segment
                part = t.slice(0, 2 * FLUSH_ROWS).filter(pc.equal(t.slice(0, 2 * FLUSH_ROWS).column("rank"), rank))
                if part.num_rows:
                    _write(os.path.join(run, "audit", f"rank{rank:05d}-seg{segs[rank]:06d}.parquet"), part)
                    segs[rank] += 1
            t = t.slice(2 * FLUSH_ROWS) if t.num_rows > 2 * FLUSH_ROWS else None
        if t is not None:
            pending.append(t)

    for path in sorted(glob.glob(os.path.join(data, "*.parquet"))):
        t = pq.read_table(path, columns=["id", "messages"])
        roles = pc.struct_field(pc.list_flatten(t.column("messages")), "role")
        parent = pc.list_parent_indices(t.column("messages")).to_numpy()
        rows = parent[pc.equal(roles, "assistant").to_numpy(zero_copy_only=False)]
        k = len(rows)
        turn = np.arange(k) - np.searchsorted(rows, rows)  # index among the dialogue's assistant messages
        step = (turns + np.arange(k)) // TURNS_PER_STEP + 1
        z = rng.normal(0, 1, k)
        w = np.where(z > 1.28, np.exp(-(z - 1.28)), 1.0)
        pending.append(pa.Table.from_pydict({
            "source": pa.array([spec.label] * k), "dialogue_id": t.column("id").take(pa.array(rows)),
            "turn": pa.array(turn, pa.int32()), "loss": rng.gamma(4.0, 0.6, k), "z": z, "weight": w,
            "warm": step > 10, "step": pa.array(step, pa.int32()), "partial": np.zeros(k, bool),
            "rank": pa.array((step + np.arange(k)) % 2, pa.int32()), "ref_loss": pa.nulls(k, pa.float64()),
            "data_weight": np.ones(k), "z_loss": z, "z_excess": pa.nulls(k, pa.float64()),
            "source_weight": np.ones(k)}, schema=SCHEMA))
        turns += k
        flush()
    flush(final=True)
    steps = turns // TURNS_PER_STEP + 1
    nb = cfg["stats"]["num_buckets"]
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "loss": 2.4, "weighted_loss": 2.3, "mean_weight": 0.96, "frac_w_lt_1": 0.1, "frac_w_lt_0.5": 0.04, "lr": 1e-5,
                                "bucket_mean": [2.4] * nb, "bucket_std": [0.6] * nb, "bucket_n": [s * 30] * nb,
                                "step_time_s": 1.0, "nonfinite_total": 0}) + "\n")
    return {"audited_turns": turns, "steps": steps}


def verdict_costs(n: int, commands: list[str], res: dict) -> dict:
    """The report, --export and --filter (those in `commands`) on a run over the corpus of n dialogues:
    time, peak memory; into res (the size's earlier entry: the commands not run keep their numbers)."""
    from resure_ds.report.audit import segments

    data, run = os.path.join(WORK, f"corpus-{n}"), os.path.join(WORK, f"run-{n}")
    build(data, n)
    t = time.perf_counter()
    res.update(synth_run(data, run))
    res["synth_s"] = time.perf_counter() - t
    res["audit_bytes"] = sum(os.path.getsize(p) for p in segments(run))
    res["audit_bytes_per_turn"] = res["audit_bytes"] / res["audited_turns"]
    out = os.path.join(WORK, f"verdict-{n}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for name, extra in (("report", []), ("export", ["--export", os.path.join(out, "verdict.parquet")]),
                        ("filter", ["--filter", os.path.join(out, "filtered"), "--min-weight", "0.5"])):
        if name not in commands:
            continue
        w = watch([PY, "-m", "resure_ds.report", run, *extra])
        assert w["rc"] == 0, (name, w["stderr"][-2000:])
        res[name] = {k: v for k, v in w.items() if k not in ("stdout", "stderr", "rc")}
        log(f"{n:,}: {name} {w['wall_s']:.1f} s, peak RSS {w['peak_rss_tree_mb']:.0f} MB")
    if "filter" in commands:
        res["filter"]["counts"] = {k: v for k, v in json.load(open(os.path.join(out, "filtered", "filter_counts.json")))
                                   .items() if k != "outputs"}
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", type=int, default=[30_000, 300_000, 3_000_000])
    ap.add_argument("--parts", nargs="*", choices=("prepare", "verdict"), default=["prepare", "verdict"])
    ap.add_argument("--commands", nargs="*", choices=("report", "export", "filter"),
                    default=["report", "export", "filter"], help="with --parts verdict: which commands to time")
    ap.add_argument("--keep", action="store_true", help="keep each size's corpus and prepared folder")
    a = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    res = json.load(open(OUT)) if os.path.exists(OUT) else {}
    res["machine"] = f"{os.cpu_count()} CPU cores, {sys.platform}"
    for n in a.sizes:
        entry = res.setdefault(str(n), {})
        if "prepare" in a.parts:
            entry.update(measure(n))
        if "verdict" in a.parts:
            entry["verdict"] = verdict_costs(n, a.commands, entry.get("verdict", {}))
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(OUT, "w") as f:
            json.dump(res, f, indent=2, default=float)
        if not a.keep:
            shutil.rmtree(os.path.join(WORK, f"prep-{n}"), ignore_errors=True)
            shutil.rmtree(os.path.join(WORK, f"run-{n}"), ignore_errors=True)
    log(f"results: {OUT}")


if __name__ == "__main__":
    main()
