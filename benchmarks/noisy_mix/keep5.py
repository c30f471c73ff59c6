"""Round 5's finished runs kept in a folder that outlives the machine (`round5.py --keep DIR`).

The grid runs for many hours and its study folder holds what one machine made: trained models,
seed data, the runs' records. Each finished run's record and sampled replies are all the tables
need, so they are kept in DIR:

    DIR/grid.json                the grid's profile and precision: every kept run has them
    DIR/<run>.json               {"record": the run's record, as in runs-*.jsonl, "replies_sha256": ...}
    DIR/<run>.replies.jsonl.gz   its sampled replies with the detector's verdicts
    DIR/base/                    the base model's outcomes (base.json, its replies), made once per grid

A new machine takes the base model's outcomes from DIR/base/ (save_base, restore_base) instead of
sampling its replies again, which was most of a quarter hour of each start on a 2-core CPU; they are
taken only under the detector and the precision they were made with.

A run's file is written after its replies, each by a rename, so a run in DIR always has its
replies, and restore checks them against their sha256. `restore` puts DIR's runs into a study
folder that lacks them (a new machine continues the grid where the last one stopped); `save`
copies the study folder's finished runs into DIR. A run held in both with two different records is
refused: one grid, one record per run. Both hold a lock in the study folder, so the two workers
started side by side take turns.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import os
import re
import shutil

from resure_ds.data.manifest import file_digest
from resure_ds.files import atomic, write_json, write_text

RUN = re.compile(r"n[0-9.]+-[a-z_]+-seed[0-9]+")  # round5.run_name's form


def _refuse(msg: str) -> SystemExit:
    return SystemExit(f"[round5] {msg}")


@contextlib.contextmanager
def _locked(out: str):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ".keep.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def finished_records(out: str):
    """Every record of the study folder's runs*.jsonl, file by file (a line without its end is one the
    other worker is writing)."""
    for fname in sorted(os.listdir(out)):
        if not (fname.startswith("runs") and fname.endswith(".jsonl")):
            continue
        with open(os.path.join(out, fname), encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip() and line.endswith("\n"):
                    try:
                        record = json.loads(line)
                    except ValueError:
                        raise _refuse(f"{os.path.join(out, fname)}, line {i}: not a run's record (a record cut "
                                      "short, then written on); remove that line, and its run is made again") from None
                    yield record


def records(out: str) -> dict:
    found = {}
    for r in finished_records(out):
        if found.get(r["name"], r) != r:
            raise _refuse(f"run {r['name']}: two different records of it in {out}/runs*.jsonl (two "
                          "runs of one arm and seed); keep one: remove the other line")
        found[r["name"]] = r
    return found


def grid_of(keep: str) -> dict | None:
    """DIR's grid.json ({"profile", "dtype"}), or None where DIR holds none yet."""
    path = os.path.join(keep, "grid.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def kept_runs(keep: str) -> dict:
    """DIR's runs by name: {"record", "replies_sha256"} (none where DIR does not exist)."""
    found = {}
    if not os.path.isdir(keep):
        return found
    for fname in sorted(os.listdir(keep)):
        if not fname.endswith(".json") or fname == "grid.json":
            continue
        path = os.path.join(keep, fname)
        try:
            with open(path, encoding="utf-8") as f:
                k = json.load(f)
            name = k["record"]["name"]
        except (ValueError, TypeError, KeyError) as e:
            raise _refuse(f"{path}: not a kept run ({type(e).__name__}: {e}); a kept run's file is "
                          "{\"record\": ..., \"replies_sha256\": ...} written by --keep: remove it") from None
        if f"{name}.json" != fname:
            raise _refuse(f"{path}: the record names run {name!r}, not the file's; a kept run's file is "
                          "<run>.json (rename it or remove it)")
        found[name] = k
    return found


def _check_grid(keep: str, grid: dict) -> None:
    theirs = grid_of(keep)
    if theirs is not None and theirs != grid:
        raise _refuse(f"{keep} keeps a grid of {theirs}; this one is {grid}: a grid's runs share one "
                      "profile and precision (another --keep folder, or --dtype/--profile as the kept grid's)")


def _differ(name: str, keep: str, out: str) -> SystemExit:
    return _refuse(f"run {name}: {keep}/{name}.json and the record in {out}/runs*.jsonl differ (two runs "
                   "of one arm and seed); keep one: remove the other record and its replies")


def _same_folder(keep: str, out: str) -> None:
    if os.path.realpath(keep) == os.path.realpath(out):
        raise _refuse(f"--keep {keep}: that is the study folder itself; name a folder of its own "
                      "(e.g. benchmarks/noisy_mix/results/round5-cpu/grid)")


def _gzip(src: str, gz: str) -> None:
    """src gzipped into gz by a rename, the same bytes each time (no name, no time in the header)."""
    with atomic(gz) as tmp, open(src, "rb") as f, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as dst:
        dst.write(f.read())


def _unzip_checked(gz: str, dest: str, sha256: str, unreadable: str, differs: str) -> None:
    """Kept replies unzipped into dest by a rename, if they are the ones kept (sha256); else a refusal
    naming gz, ending in `unreadable` or `differs`, and dest is left as it was."""
    with atomic(dest) as tmp:
        try:
            with gzip.open(gz, "rb") as f, open(tmp, "wb") as g:
                g.write(f.read())
        except (OSError, EOFError) as e:
            raise _refuse(f"{gz}: {type(e).__name__}: {e}; {unreadable}") from None
        if file_digest(tmp)[1] != sha256:
            raise _refuse(f"{gz}: {differs}")


def restore(keep: str, out: str, grid: dict) -> list[str]:
    """DIR's runs that the study folder lacks, written into it (out/runs-kept.jsonl and each run's
    out/runs/<run>/replies.jsonl). Returns the runs restored."""
    _same_folder(keep, out)
    if not os.path.isdir(keep):
        return []
    _check_grid(keep, grid)
    with _locked(out):
        have, kept = records(out), kept_runs(keep)
        new, made = [], []
        try:
            for name, k in sorted(kept.items()):
                if name in have:
                    if have[name] != k["record"]:
                        raise _differ(name, keep, out)
                    continue
                folder = os.path.join(out, "runs", name)
                if not os.path.isdir(folder):
                    made.append(folder)
                os.makedirs(folder, exist_ok=True)
                _unzip_checked(os.path.join(keep, f"{name}.replies.jsonl.gz"), os.path.join(folder, "replies.jsonl"),
                               k["replies_sha256"], f"the kept replies of run {name} cannot be read: remove "
                               f"{name}.json beside it, and the run is made again", f"not the replies its run "
                               f"{name} kept (sha256 differs); remove {name}.json beside it, and the run is made again")
                new.append(name)
        except BaseException:  # a refused restore leaves no folder of its own behind: none holds a run
            for folder in made:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        if new:  # rewritten whole, by a rename: a killed restore leaves the file as it was
            path = os.path.join(out, "runs-kept.jsonl")
            old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
            write_text(path, old + "".join(json.dumps(kept[n]["record"]) + "\n" for n in new))
    return new


def save(keep: str, out: str, grid: dict) -> list[str]:
    """The study folder's finished runs that DIR lacks (or whose replies it lacks), copied into it.
    Returns the runs saved."""
    _same_folder(keep, out)
    os.makedirs(keep, exist_ok=True)
    with _locked(out):
        _check_grid(keep, grid)
        kept, new = kept_runs(keep), []
        if grid_of(keep) is None:
            write_json(os.path.join(keep, "grid.json"), grid)
        for name, r in sorted(records(out).items()):
            if not RUN.fullmatch(name):
                raise _refuse(f"run {name!r} in {out}/runs*.jsonl: not a name round5.py gives a run")
            if r.get("dtype") != grid["dtype"]:
                raise _refuse(f"run {name} in {out}/runs*.jsonl was made in {r.get('dtype')}, this grid in "
                              f"{grid['dtype']}: keep one precision per folder")
            gz = os.path.join(keep, f"{name}.replies.jsonl.gz")
            if name in kept:
                if kept[name]["record"] != r:
                    raise _differ(name, keep, out)
                if os.path.exists(gz):
                    continue
            replies = os.path.join(out, "runs", name, "replies.jsonl")
            if not os.path.exists(replies):
                raise _refuse(f"run {name}: its record is in {out}/runs*.jsonl but its replies ({replies}) are "
                              "missing; run it again (delete its line and its folder)")
            _gzip(replies, gz)
            write_json(os.path.join(keep, f"{name}.json"), {"record": r, "replies_sha256": file_digest(replies)[1]})
            new.append(name)
    return new


def _base_files(folder: str) -> tuple[str, str]:
    return os.path.join(folder, "base.json"), os.path.join(folder, "base-replies.jsonl")


def save_base(keep: str, out: str, detector_sha256: str) -> bool:
    """The study folder's base outcomes into DIR/base/, once (False: DIR has them, or out has none)."""
    _same_folder(keep, out)
    (mine, replies), folder = _base_files(out), os.path.join(keep, "base")
    kept = os.path.join(folder, "base.json")
    with _locked(out):
        if os.path.exists(kept) or not (os.path.exists(mine) and os.path.exists(replies)):
            return False
        os.makedirs(folder, exist_ok=True)
        _gzip(replies, os.path.join(folder, "base-replies.jsonl.gz"))
        with open(mine, encoding="utf-8") as f:
            base = json.load(f)
        # last: a kept base.json has its replies
        write_json(kept, {"base": base, "detector_sha256": detector_sha256, "replies_sha256": file_digest(replies)[1]})
    return True


def restore_base(keep: str, out: str, detector_sha256: str, matmul: str) -> bool:
    """DIR/base/ into a study folder that has no base outcomes yet (False: nothing to take). Outcomes
    of another detector or precision, or replies not the kept ones, are refused, never used."""
    _same_folder(keep, out)
    kept, gz = os.path.join(keep, "base", "base.json"), os.path.join(keep, "base", "base-replies.jsonl.gz")
    mine, replies = _base_files(out)
    with _locked(out):
        if not os.path.exists(kept) or os.path.exists(mine):
            return False
        try:
            with open(kept, encoding="utf-8") as f:
                k = json.load(f)
            made = (k["detector_sha256"], k["base"]["bf16_matmul"])
        except (ValueError, TypeError, KeyError) as e:
            raise _refuse(f"{kept}: not kept base outcomes ({type(e).__name__}: {e}); remove "
                          f"{os.path.dirname(kept)}, and they are made again") from None
        if made != (detector_sha256, matmul):
            raise _refuse(f"{kept}: made with detector {made[0][:12]} and {made[1]} products, this grid judges "
                          f"with {detector_sha256[:12]} and {matmul}: remove {os.path.dirname(kept)}, and they "
                          "are made again")
        again = f"remove {os.path.dirname(kept)}, and the base outcomes are made again"
        _unzip_checked(gz, replies, k["replies_sha256"], again,
                       f"not the replies kept with {kept} (sha256 differs); {again}")
        write_json(mine, k["base"])
    return True
