"""Round 5's finished runs kept in a folder that outlives the machine (`round5.py --keep DIR`).

The grid runs for many hours and its study folder holds what one machine made: trained models,
seed data, the runs' records. Each finished run's record and sampled replies are all the tables
need, so they are kept in DIR, one pair of files per run:

    DIR/<run>.json               the run's record, as in the study folder's runs-*.jsonl
    DIR/<run>.replies.jsonl.gz   its 400 sampled replies with the detector's verdicts

A run's record is written after its replies, each by a rename, so a record in DIR always has its
replies. `restore` puts DIR's runs into a study folder that lacks them (a new machine continues the
grid where the last one stopped); `save` copies the study folder's finished runs into DIR. A run
held in both with two different records is refused: one grid, one record per run.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import shutil


def _records(out: str) -> dict:
    found = {}
    for path in sorted(glob.glob(os.path.join(out, "runs*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip() and line.endswith("\n"):  # a line without its end is being written
                    r = json.loads(line)
                    if found.get(r["name"], r) != r:
                        raise SystemExit(f"[round5] run {r['name']}: two different records of it in "
                                         f"{out}/runs*.jsonl (two runs of one arm and seed); keep one: remove "
                                         "the other line")
                    found[r["name"]] = r
    return found


def kept_runs(keep: str) -> dict:
    """DIR's runs by name (none where DIR does not exist)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(keep, "*.json"))):
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        if f"{r.get('name')}.json" != os.path.basename(path):
            raise SystemExit(f"[round5] {path}: the record names run {r.get('name')!r}, not the file's; "
                             "a kept run's file is <run>.json (rename it or remove it)")
        found[r["name"]] = r
    return found


def _differ(name: str, keep: str, out: str) -> SystemExit:
    return SystemExit(f"[round5] run {name}: {keep}/{name}.json and the record in {out}/runs*.jsonl differ "
                      "(two runs of one arm and seed); keep one: remove the other record and its replies")


def restore(keep: str, out: str) -> list[str]:
    """DIR's runs that the study folder lacks, written into it (out/runs-kept.jsonl and each run's
    out/runs/<run>/replies.jsonl). Returns the runs restored."""
    if not os.path.isdir(keep):
        return []
    have, kept = _records(out), kept_runs(keep)
    new = []
    for name, r in sorted(kept.items()):
        if name in have:
            if have[name] != r:
                raise _differ(name, keep, out)
            continue
        folder = os.path.join(out, "runs", name)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"replies.jsonl.{os.getpid()}.tmp")
        with gzip.open(os.path.join(keep, f"{name}.replies.jsonl.gz"), "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, os.path.join(folder, "replies.jsonl"))
        new.append(name)
    if new:
        with open(os.path.join(out, "runs-kept.jsonl"), "a", encoding="utf-8") as f:
            for name in new:
                f.write(json.dumps(kept[name]) + "\n")
    return new


def save(keep: str, out: str) -> list[str]:
    """The study folder's finished runs that DIR lacks, copied into it. Returns the runs saved."""
    os.makedirs(keep, exist_ok=True)
    kept, new = kept_runs(keep), []
    for name, r in sorted(_records(out).items()):
        if name in kept:
            if kept[name] != r:
                raise _differ(name, keep, out)
            continue
        replies = os.path.join(out, "runs", name, "replies.jsonl")
        if not os.path.exists(replies):
            raise SystemExit(f"[round5] run {name}: its record is in {out}/runs*.jsonl but its replies "
                             f"({replies}) are missing; run it again (delete its line and its folder)")
        tmp = os.path.join(keep, f".{name}.{os.getpid()}.tmp")
        with open(replies, "rb") as src, gzip.open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, os.path.join(keep, f"{name}.replies.jsonl.gz"))
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(r, f)
        os.replace(tmp, os.path.join(keep, f"{name}.json"))
        new.append(name)
    return new
