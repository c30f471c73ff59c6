"""A prepared folder's manifest.json: what it was made from, its shards and its counts."""
from __future__ import annotations

import hashlib
import json
import os
import re

from ..config.parse import SourceSpec, parse_layout
from ..errors import DataError
from ..files import write_json
from . import remote
from .sources import PREPARED_FORMAT

SHARD_NAME = re.compile(r"[0-9]{5,}\.arrow")  # what prepare names them

FORMAT_VERSION = 3  # of the prepared folder: shards and manifest (2: each shard's size and SHA-256;
                   # 3: rows apart from dialogues, data.overflow's counts)


def write_manifest(folder: str, manifest: dict) -> None:
    write_json(os.path.join(folder, "manifest.json"), {"format": PREPARED_FORMAT, "version": FORMAT_VERSION,
                                                       **manifest}, indent=2)


def read_manifest(folder: str) -> dict:
    """A prepared folder's manifest (local or in an object store), checked to be one this version
    reads and safe to follow: shard names are plain file names (a manifest edited to name ../x or /x
    would have a copy written, or a shard read, outside the folder)."""
    path = remote.join(folder, "manifest.json")
    fix = "prepare the data again (python -m resure_ds.data.prepare RECIPE)"
    try:
        m = json.loads(remote.read_bytes(path))
    except (OSError, ValueError) as e:
        raise DataError(f"{remote.shown(folder)}: no readable manifest.json ({e}); {fix}") from None
    if not isinstance(m, dict) or m.get("format") != PREPARED_FORMAT or m.get("version") != FORMAT_VERSION:
        raise DataError(f"{remote.shown(path)}: not a resure-ds prepared folder of format version {FORMAT_VERSION}; "
                        f"{fix}")
    shards, counts, source = m.get("shards"), m.get("counts"), m.get("source")
    if not isinstance(shards, list) or not isinstance(counts, dict) or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and SHARD_NAME.fullmatch(s["file"])
            and isinstance(s.get("bytes"), int) and isinstance(s.get("sha256"), str) for s in shards) \
            or not all(type(counts.get(k)) is int for k in ("dialogues", "rows", "tokens", "records")) \
            or not isinstance(source, dict) or not isinstance(source.get("path"), str) \
            or not isinstance(m.get("key"), str) or (counts["dialogues"] > 0 and not shards):
        raise DataError(f"{remote.shown(path)}: damaged (its shards or counts are not as prepare writes them: each "
                        f"shard a plain file name with its bytes and SHA-256); delete {remote.shown(folder)} and "
                        f"{fix}")
    return m


def manifest_source(folder: str) -> SourceSpec:
    """The raw source a prepared folder was made from (to find turn texts for reports)."""
    src = read_manifest(folder)["source"]
    lay = src.get("layout") or {}
    return SourceSpec(src["path"], layout=parse_layout(lay.get("format"), lay.get("columns"), "")[0])


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex) of a file, read in 8 MiB blocks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


VERIFIED = ".verified.json"  # in a prepared folder: shard -> [size, mtime_ns, ctime_ns, inode, SHA-256] when last hashed


def verify_shards(folder: str, manifest: dict, checksums: bool = True) -> None:
    """Every shard the manifest lists is there with the size (and SHA-256) it was written with: a
    shard damaged after prepare (truncated, overwritten, half copied) is named here, before any
    rank or loader worker reads it. Checksums are incremental: a shard whose size, modification and
    change times and inode are those it had when it was last hashed here (.verified.json) is not read
    again, so a launch costs a stat per shard; a shard written since (copied, restored from a backup
    with its times, edited) is hashed: no user command sets a file's change time back."""
    seen = _verified(folder) if checksums else {}
    now = {}
    for s in manifest["shards"]:
        path = os.path.join(folder, s["file"])
        fix = (f"delete {folder} and prepare again (python -m resure_ds.data.prepare RECIPE), or restore "
               "the folder from where it was copied")
        try:
            st = os.stat(path)
        except OSError:
            raise DataError(f"{path}: a shard of this prepared folder is missing; {fix}") from None
        if st.st_size != s["bytes"]:
            raise DataError(f"{path}: {st.st_size} bytes, {s['bytes']} were written (damaged after prepare); {fix}")
        if not checksums:
            continue
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, s["sha256"]]
        if seen.get(s["file"]) != stamp and file_digest(path)[1] != s["sha256"]:
            raise DataError(f"{path}: its SHA-256 differs from the one recorded at prepare (damaged after "
                            f"prepare); {fix}")
        now[s["file"]] = stamp
    if checksums and now != seen:
        try:
            write_json(os.path.join(folder, VERIFIED), now)
        except OSError:  # a read-only copy: it is hashed whole at every launch instead
            pass


def _verified(folder: str) -> dict:
    try:
        with open(os.path.join(folder, VERIFIED), encoding="utf-8") as f:
            seen = json.load(f)
        return seen if isinstance(seen, dict) else {}
    except (OSError, ValueError):
        return {}
