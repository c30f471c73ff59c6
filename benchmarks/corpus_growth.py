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
epoch (open the shards, one permutation, one window). Results: benchmarks/results/corpus_growth.json
(each size's entry rewritten as it finishes).
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
from benchmarks.corpus_scale import PY, base_dialogues, run_prepare  # noqa: E402

WORK = os.path.join(ROOT, "benchmarks", "work", "corpus_growth")
OUT = os.path.join(ROOT, "benchmarks", "results", "corpus_growth.json")
PER_FILE = 10_000


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", type=int, default=[30_000, 300_000, 3_000_000])
    ap.add_argument("--keep", action="store_true", help="keep each size's corpus and prepared folder")
    a = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    res = json.load(open(OUT)) if os.path.exists(OUT) else {}
    res["machine"] = f"{os.cpu_count()} CPU cores, {sys.platform}"
    for n in a.sizes:
        res[str(n)] = measure(n)
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(OUT, "w") as f:
            json.dump(res, f, indent=2, default=float)
        if not a.keep:
            shutil.rmtree(os.path.join(WORK, f"prep-{n}"), ignore_errors=True)
    log(f"results: {OUT}")


if __name__ == "__main__":
    main()
