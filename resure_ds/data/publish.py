"""Prepared folders in an object store (data.prepared_dir: s3://bucket/prepared): publish and fetch.

Publish. Every prepare task renders its units into a local staging folder (in the node's cache), and
uploads each finished unit: its shard, then its record (<folder>/units/NNNNN.json). Task 0 waits
for every record and writes manifest.json last. A folder in the store without manifest.json is
unfinished and is never read as prepared; prepare run again resumes from the records it finds.

Fetch. A node copies a published folder once into $RESURE_CACHE/fetched/<name-key>-<hash of the URL>
(file-locked: one process of the node downloads, the others wait), checks every shard's size and
SHA-256 on the copy, and writes the manifest last. The next launch finds the copy (its manifest equal
to the store's) and reads only the store's manifest. Reference losses (stats.reference) scored
beside a copy are uploaded beside the published folder, and fetched with it by the other nodes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time

from ..errors import DataError
from ..files import write_json, write_text
from ..models import cache_root
from . import remote
from .manifest import file_digest, read_manifest, verify_shards

ORIGIN = ".origin"  # in a fetched copy: the URL it was copied from (to publish reference losses back)


def local_copy(url: str) -> str:
    """Where this node keeps its copy of a published folder."""
    digest = hashlib.sha256(remote.shown(url).rstrip("/").encode()).hexdigest()[:8]
    return os.path.join(cache_root(), "fetched", f"{url.rstrip('/').rsplit('/', 1)[-1]}-{digest}")


def staging(url: str) -> str:
    """Where this node's prepare tasks render their units before uploading them (fetch then finds
    them there instead of downloading them again)."""
    return local_copy(url) + ".partial"


def remote_manifest(url: str) -> dict | None:
    """A published folder's manifest (checked as read_manifest checks one), None while it has none
    (not published, or unfinished)."""
    if not remote.exists(remote.join(url, "manifest.json")):
        return None
    return read_manifest(url)


def unit_name(i: int) -> str:
    return f"units/{i:05d}.json"


def recorded_units(url: str) -> set[int]:
    """Units whose shard and record are in the store."""
    folder = remote.join(url, "units")
    if not remote.exists(folder):
        return set()
    return {int(n[:-5]) for n in remote.listdir(folder) if n.endswith(".json") and n[:-5].isdigit()}


def upload_unit(url: str, stage: str, i: int, record: dict) -> None:
    """A finished unit into the store: the shard, then the record (which says the shard is whole).
    Nothing when the record is there (another node, preparing the same source, was first)."""
    if remote.exists(remote.join(url, unit_name(i))):
        return
    remote.put(os.path.join(stage, record["file"]), remote.join(url, record["file"]))
    remote.write_bytes(remote.join(url, unit_name(i)), json.dumps(record).encode())


def failed_tasks(url: str) -> list[str]:
    return [n for n in remote.listdir(url) if n.startswith("failed-task")] if remote.exists(url) else []


def note_failure(url: str, task: int, message: str) -> None:
    with contextlib.suppress(DataError):  # the store may be what failed
        remote.write_bytes(remote.join(url, f"failed-task{task}.txt"), message.encode())


def clear_failures(url: str, task: int, tasks: int) -> None:
    """An earlier attempt's failure note of this task (of every task, when one task prepares it all)."""
    for name in failed_tasks(url):
        if name == f"failed-task{task}.txt" or tasks == 1:
            remote.remove(remote.join(url, name))


def wait_for_units(url: str, n: int, wait_s: float) -> list[dict] | dict:
    """Task 0: every unit's record, once all are in the store (or a task failed); or the manifest, if
    another node preparing the same source published it meanwhile."""
    deadline = time.time() + wait_s
    while True:
        published = remote_manifest(url)
        if published is not None:
            return published
        failed = failed_tasks(url)
        if failed:
            text = remote.read_bytes(remote.join(url, failed[0])).decode("utf-8", "replace")
            raise DataError(f"prepare {failed[0][7:-4]} failed: {text}")
        missing = sorted(set(range(n)) - recorded_units(url))
        if not missing:
            return [json.loads(remote.read_bytes(remote.join(url, unit_name(i)))) for i in range(n)]
        if time.time() > deadline:
            raise DataError(f"{remote.shown(url)}: after {wait_s:.0f} s, {len(missing)} unit(s) are still not "
                            f"published (first: {missing[0]}); is every prepare task running? Run prepare again to "
                            "resume")
        time.sleep(1.0)


def publish_manifest(url: str, manifest: dict) -> dict:
    """The last write of a publication: from here on the folder is prepared. The unit records stay
    (another node preparing the same source may be reading them). Returns the manifest published:
    one already there (another node's) is kept."""
    there = remote_manifest(url)
    if there is not None:
        return there
    remote.write_bytes(remote.join(url, "manifest.json"), json.dumps(manifest, indent=2).encode())
    return manifest


def fetch(url: str, m: dict, checksums: bool = False) -> str:
    """This node's verified copy of a published folder (downloaded now, or found from before)."""
    from filelock import FileLock

    dest = local_copy(url)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with FileLock(dest + ".lock"):
        if _same_manifest(dest, m):
            verify_shards(dest, m, checksums)
        else:
            _download(url, m, dest)
        _fetch_references(url, dest)
    return dest


def _same_manifest(dest: str, m: dict) -> bool:
    """The copy holds the published data: the same key and shards (two nodes that prepared the same
    source at once publish manifests that differ in their timings only)."""
    try:
        with open(os.path.join(dest, "manifest.json"), encoding="utf-8") as f:
            have = json.load(f)
        return [have.get(k) for k in ("key", "shards")] == [m.get(k) for k in ("key", "shards")]
    except (OSError, ValueError, AttributeError):
        return False


def _download(url: str, m: dict, dest: str) -> None:
    tmp = staging(url)
    os.makedirs(tmp, exist_ok=True)
    fix = (f"prepare again: delete {remote.shown(url)} from the store and run python -m resure_ds.data.prepare "
           "RECIPE")
    for s in m["shards"]:
        path, src = os.path.join(tmp, s["file"]), remote.join(url, s["file"])
        if not (os.path.exists(path) and file_digest(path) == (s["bytes"], s["sha256"])):
            if not remote.exists(src):
                raise DataError(f"{remote.shown(src)}: a shard of this published folder is missing from the store; "
                                f"{fix}")
            remote.get(src, path)
            size, sha = file_digest(path)
            if (size, sha) != (s["bytes"], s["sha256"]):
                os.remove(path)
                what = f"{size} bytes, {s['bytes']} were written" if size != s["bytes"] else "its SHA-256 differs"
                raise DataError(f"{remote.shown(src)}: {what} at prepare (changed or damaged in the store since); "
                                f"{fix}")
    shutil.rmtree(os.path.join(tmp, "units"), ignore_errors=True)
    write_text(os.path.join(tmp, ORIGIN), remote.shown(url))
    write_json(os.path.join(tmp, "manifest.json"), m, indent=2)
    if os.path.exists(dest):  # a copy of an earlier publication under the same name
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def _fetch_references(url: str, dest: str) -> None:
    """Reference losses published beside the folder that this copy lacks."""
    for name in remote.listdir(url):
        there = remote.join(url, name, "reference.json")
        if not name.startswith("reference-") or os.path.exists(os.path.join(dest, name, "reference.json")) \
                or not remote.exists(there):
            continue
        tmp = os.path.join(dest, f"{name}.tmp{os.getpid()}")
        os.makedirs(tmp, exist_ok=True)
        for f in ("turn_loss.npy", "offsets.npy", "reference.json"):
            remote.get(remote.join(url, name, f), os.path.join(tmp, f))
        os.replace(tmp, os.path.join(dest, name))


def publish_reference(folder: str) -> None:
    """Reference losses written beside a fetched copy -> beside the published folder, reference.json
    last (other nodes fetch them from there). Nothing for a local prepared folder."""
    origin = os.path.join(os.path.dirname(folder), ORIGIN)
    if not os.path.exists(origin):
        return
    with open(origin, encoding="utf-8") as f:
        url = remote.join(f.read().strip(), os.path.basename(folder))
    for name in ("turn_loss.npy", "offsets.npy", "reference.json"):
        remote.put(os.path.join(folder, name), remote.join(url, name))
