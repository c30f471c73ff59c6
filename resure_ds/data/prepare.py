"""Prepare once: validate, render and tokenize every source of data.train into
token shards (data/shards.py) with a manifest; training only maps and batches.

    python -m resure_ds.data.prepare [RECIPE.yaml] [key=value ...] [--workers N]

The same recipe and overrides as training. Each source lands in
`<data.prepared_dir>/<name>-<key>/`, where the key hashes the source files'
fingerprints (path, size, mtime, head and tail bytes), the tokenizer, the
chat template, data.max_length, data.overflow, data.train_reasoning and data.skip_invalid: running it again on
unchanged inputs is a cache hit that reads no record. Every invalid record,
template refusal and dialogue left with nothing to train is found here,
before any training rank starts: one error naming file and record, or
counts per kind under data.skip_invalid.

On several machines, start one task per node (or per rank) over a shared
filesystem: each task takes the units u with u % tasks == task, task 0
waits for the others and writes the manifest. Tasks are found from
RANK/WORLD_SIZE, SLURM_PROCID/SLURM_NTASKS, OMPI_COMM_WORLD_RANK/SIZE or
PMI_RANK/PMI_SIZE when --tasks-from-env is given (launch/prepare.sh does):

    srun --ntasks-per-node 1 bash launch/prepare.sh RECIPE.yaml data.train=/data/shards/

A unit's shard is published (renamed) before its record, so an interrupted
prepare resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass

from ..config import Config, load_config, positive, recipe_parser, split_recipe_args
from ..config.parse import Layout, SourceSpec, config_layout, train_specs
from ..errors import DataError, run_command
from ..files import input_root, inside as files_inside
from ..models import cache_root, resolve_model_path
from . import overflow, publish, remote
from .manifest import FORMAT_VERSION, file_digest, read_manifest, verify_shards, write_manifest
from .overflow import OverflowCounts
from .records import SkipCounter
from .reference import scored_keys
from .render import RENDER_VERSION
from .sources import PREPARED_FORMAT, Source, resolve, source_fingerprint, units_of
from .tokenizer_memo import OnDemand, fingerprints_of
from .units import run_units, unit_record

UNSCORED = 3  # exit status of --check-reference when stats.reference has sources left to score


@dataclass
class Prepared:
    spec: SourceSpec
    folder: str
    manifest: dict
    hit: bool  # found ready (cache hit or a prepared folder given as the source)


def log(msg: str) -> None:
    print(f"[resure_ds] {msg}", file=sys.stderr, flush=True)


# -- keys -----------------------------------------------------------------------
def tokenizer_fingerprints(tok) -> dict:
    """A tokenizer's, or an OnDemand one's (from its memo when it has one)."""
    return tok.fingerprints() if isinstance(tok, OnDemand) else fingerprints_of(tok)


def _slug(text: str) -> str:
    base = os.path.basename(text.rstrip("/*")) or text
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:40].strip("._") or "data"


def prepared_root(cfg: Config) -> str:
    return remote.normal(remote.local(cfg.data.prepared_dir)) if cfg.data.prepared_dir else \
        os.path.join(cache_root(), "prepared")


def check_prepared_dir(cfg: Config) -> None:
    """data.prepared_dir may not lie where a source would read what prepare writes there (its manifests
    and unit records are .json files): inside a source folder (read recursively), or under a glob that
    reaches below its first level and matches .json names. Checked for every source, training and
    validation, before anything is written."""
    root = prepared_root(cfg)
    if not remote.is_url(root) and os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"data.prepared_dir={cfg.data.prepared_dir}: {root} is a file; give a folder for the "
                          "prepared shards (made if missing)")
    paths = [s.path for s in train_specs(cfg.data)] + ([cfg.data.eval] if isinstance(cfg.data.eval, str) else [])
    for spec_path in paths:
        path = remote.local(spec_path)
        if path == "chitchat":
            continue
        if any(c in path for c in "*?["):
            rest = path[len(input_root(path)):].strip("/")
            last = rest.rsplit("/", 1)[-1]
            if ("/" not in rest and "**" not in rest) or not any(
                    fnmatch.fnmatchcase(n, last) for n in ("manifest.json", "00000.json", "reference.json")):
                continue
        where = remote.normal(input_root(path)).rstrip("/")
        if remote.is_url(root) != remote.is_url(where):
            continue
        inside = (root.rstrip("/") + "/").startswith(where + "/") if remote.is_url(root) else \
            (os.path.isdir(where) and files_inside(root, where))
        if inside:
            raise DataError(f"data.prepared_dir={remote.shown(root)} lies inside the source {remote.shown(spec_path)}: "
                            "the manifests and records prepare writes would be read as the source's files; give a "
                            "prepared_dir outside the training and validation data")


def prepared_folder(spec: SourceSpec, src: Source, fps: dict, cfg: Config, key: str | None = None) -> str:
    """Where a raw source's shards go (or are found): <data.prepared_dir>/<name>-<key> (the key given,
    or the source's now)."""
    return remote.join(prepared_root(cfg), f"{_slug(spec.label)}-{key or source_key(src, fps, cfg)}")


def source_key(src: Source, fps: dict, cfg: Config, files: list | None = None) -> str:
    """The prepared folder's key: the source's files as fingerprinted (`files`, else now), the
    tokenizer and the settings that change the shards."""
    blob = json.dumps({"version": FORMAT_VERSION, "render": RENDER_VERSION, "kind": src.kind,
                       "files": source_fingerprint(src) if files is None else files, **fps,
                       "max_length": cfg.data.max_length, "overflow": cfg.data.overflow,
                       "skip_invalid": cfg.data.skip_invalid, "train_reasoning": cfg.data.train_reasoning,
                       # the default layout adds nothing, so caches made before layouts existed still hit
                       **({"layout": src.spec.layout.to_dict()} if src.spec.layout != Layout() else {})},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _merge(partial_dir: str, n_units: int, meta: dict) -> dict:
    units = []
    for i in range(n_units):
        with open(unit_record(partial_dir, i), encoding="utf-8") as f:
            units.append(json.load(f))
    return merge_records(units, meta)


def merge_records(units: list[dict], meta: dict) -> dict:
    """The manifest: meta, the units' counts summed, and their shards."""
    skipped = SkipCounter()
    for u in units:
        for k, v in u["skipped"].items():
            skipped.add(k, v)
    counts = {k: sum(u[k] for u in units) for k in ("dialogues", "rows", "tokens", "trained_tokens",
                                                     "partial_turns", "no_trained_token", "reasoning_not_rendered")}
    counts["overflow"] = {k: sum(u["overflow"][k] for u in units) for k in OverflowCounts().to_dict()}
    counts["skipped"] = dict(sorted(skipped.items()))
    counts["records"] = (counts["dialogues"] + counts["no_trained_token"] + counts["overflow"]["dropped"]
                         + sum(skipped.values()))
    return {**meta, "counts": counts,
            "shards": [{k: u[k] for k in ("file", "input", "bytes", "sha256", "dialogues", "tokens")} for u in units]}


def task_of_env() -> tuple[int, int]:
    """(task, tasks) of a multi-process prepare, from the launcher's environment."""
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"),
                 ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")):
        if os.environ.get(r) is not None and os.environ.get(w) is not None:
            return int(os.environ[r]), int(os.environ[w])
    return 0, 1


def _empty_error(spec: SourceSpec, m: dict) -> DataError:
    c = m["counts"]
    return DataError(f"{spec.label}: no trainable dialogue (records read: {c['records']}; invalid skipped: "
                     f"{SkipCounter(c['skipped']).summary()}; left with no trained token by data.max_length="
                     f"{m['max_length']}: {c['no_trained_token']}; longer than data.max_length, dropped "
                     f"(data.overflow=drop): {c['overflow']['dropped']}). Add data, fix the records, raise "
                     "data.max_length or set data.overflow=split")


def prepare_source(spec: SourceSpec, cfg: Config, tokenizer, model_path: str, workers: int,
                   task: tuple[int, int] = (0, 1), progress: bool = True, wait_s: float = 86400,
                   checksums: bool = True) -> Prepared:
    """Make sure one source is prepared; returns where. Task 0 of several publishes the manifest.
    A prepared folder found ready is verified against its manifest first (sizes, and SHA-256 sums
    where `checksums`: the prepare command checks them, training ranks check sizes)."""
    from filelock import FileLock

    src = resolve(spec)
    fps = tokenizer_fingerprints(tokenizer)
    if src.kind == "prepared":
        url = src.files[0] if remote.is_url(src.files[0]) else None
        m = read_manifest(src.files[0]) if url is None else publish.remote_manifest(url)
        if m is None:
            raise DataError(f"{remote.shown(url)}: no manifest.json (an unfinished publication); prepare again")
        want = {**fps, "max_length": cfg.data.max_length, "overflow": cfg.data.overflow}
        have = {k: m.get(k) for k in want}
        if have != want:
            diff = ", ".join(k for k in want if have[k] != want[k])
            raise DataError(f"{src.files[0]}: prepared with another {diff} than this recipe's; prepare the raw "
                            "source again with this recipe (python -m resure_ds.data.prepare RECIPE)")
        if url is not None:
            return Prepared(spec, publish.fetch(url, m, checksums), m, True)
        verify_shards(src.files[0], m, checksums)
        return Prepared(spec, src.files[0], m, True)
    files = source_fingerprint(src)  # once: the key, and what the end of the prepare compares with
    key = source_key(src, fps, cfg, files)
    root = prepared_root(cfg)
    check_prepared_dir(cfg)
    folder = prepared_folder(spec, src, fps, cfg, key)
    meta = lambda t0: _meta(spec, src, key, files, fps, cfg, workers, task[1], t0)  # noqa: E731
    if remote.is_url(root):
        return _prepare_published(spec, src, folder, meta, workers, task, progress, wait_s, checksums, model_path,
                                  cfg, tokenizer)
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    me, tasks = task
    # One process of this machine prepares, the others wait; tasks of a multi-task prepare
    # split the units instead.
    with FileLock(folder + ".lock") if tasks == 1 else contextlib.nullcontext():
        if os.path.exists(os.path.join(folder, "manifest.json")):
            m = read_manifest(folder)
            if m["counts"]["dialogues"] == 0:
                raise _empty_error(spec, m)
            verify_shards(folder, m, checksums)
            return Prepared(spec, folder, m, True)
        units = units_of(src)
        partial = folder + ".partial"
        os.makedirs(partial, exist_ok=True)
        publish.clear_failures(partial, me, tasks)
        todo = [(u, i, partial) for i, u in enumerate(units)
                if i % tasks == me and not os.path.exists(unit_record(partial, i))]
        _render_share(spec, len(units), todo, folder, partial, task, workers, model_path, cfg, tokenizer, progress)
        if me != 0:
            return Prepared(spec, folder, {}, False)
        _wait_for_units(partial, len(units), wait_s)
        m = _merge(partial, len(units), meta(t0))
        shutil.rmtree(os.path.join(partial, "units"))
        write_manifest(partial, m)
        os.replace(partial, folder)
    _done(spec, m, cfg, t0, progress)
    return Prepared(spec, folder, m, False)


def _meta(spec: SourceSpec, src: Source, key: str, files: list, fps: dict, cfg: Config, workers: int, tasks: int,
          t0: float) -> dict:
    """The manifest's description of the source, fingerprinted again now that every unit is rendered:
    a file edited, appended to or replaced while it was read would leave shards of two versions under
    the first one's key, so it is refused and nothing is published."""
    remote.refresh(src.files)
    now = source_fingerprint(src)
    if now != files:
        changed = [str(b[0]) for a, b in zip(files, now) if a != b] or ["the list of files"]
        raise DataError(f"{spec.label}: {', '.join(remote.shown(c) for c in changed[:3])}"
                        f"{f' and {len(changed) - 3} more' if len(changed) > 3 else ''} changed while prepare read "
                        "it; nothing was published. Run prepare again once the source stays as it is (its shards "
                        "are made anew, under the new version's key)")
    return {"source": {"path": spec.path, "kind": src.kind, "files": files,
                       "layout": spec.layout.to_dict()},
            "name": spec.label, "key": key, **fps, "max_length": cfg.data.max_length,
            "overflow": cfg.data.overflow, "skip_invalid": cfg.data.skip_invalid, "workers": workers, "tasks": tasks,
            "seconds": round(time.perf_counter() - t0, 2)}


def _done(spec: SourceSpec, m: dict, cfg: Config, t0: float, progress: bool) -> None:
    """The prepared source's summary line; a source left with nothing to train is an error."""
    c = m["counts"]
    if progress:
        dt = max(time.perf_counter() - t0, 1e-9)
        log(f"prepared {spec.label}: {c['dialogues']:,} dialogues in {c['rows']:,} rows, {c['tokens']:,} tokens "
            f"({c['trained_tokens']:,} trained) in {dt:.1f} s ({c['dialogues'] / dt:,.0f} dialogues/s, "
            f"{c['tokens'] / dt:,.0f} tokens/s); skipped: {SkipCounter(c['skipped']).summary()}; "
            f"over data.max_length ({cfg.data.overflow}): {overflow.summary(c)}; "
            f"no trained token: {c['no_trained_token']:,}"
            + (f"; reasoning_content the chat template does not render: {c['reasoning_not_rendered']:,}"
               if c["reasoning_not_rendered"] else ""))
    if c["dialogues"] == 0:
        raise _empty_error(spec, m)


def _prepare_published(spec: SourceSpec, src: Source, url: str, meta, workers: int, task: tuple[int, int],
                       progress: bool, wait_s: float, checksums: bool, model_path: str, cfg: Config,
                       tokenizer) -> Prepared:
    """prepare_source with data.prepared_dir in an object store (data/publish.py): the units rendered
    here, uploaded one by one, the manifest published by task 0 when all are in the store, then this
    node's verified copy."""
    from filelock import FileLock

    t0, (me, tasks) = time.perf_counter(), task
    stage = publish.staging(url)
    os.makedirs(os.path.dirname(stage), exist_ok=True)
    with FileLock(publish.local_copy(url) + ".prepare.lock") if tasks == 1 else contextlib.nullcontext():
        m = publish.remote_manifest(url)
        if m is not None:
            if m["counts"]["dialogues"] == 0:
                raise _empty_error(spec, m)
            return Prepared(spec, publish.fetch(url, m, checksums), m, True)
        units = units_of(src)
        os.makedirs(stage, exist_ok=True)
        publish.clear_failures(url, me, tasks)
        there = publish.recorded_units(url)
        mine = [i for i in range(len(units)) if i % tasks == me and i not in there]
        upload = lambda i, record: publish.upload_unit(url, stage, i, record)  # noqa: E731
        for i in [i for i in mine if os.path.exists(unit_record(stage, i))]:  # rendered, not uploaded, last time
            with open(unit_record(stage, i), encoding="utf-8") as f:
                record = json.load(f)
            shard = os.path.join(stage, record["file"])
            if os.path.exists(shard) and file_digest(shard) == (record["bytes"], record["sha256"]):
                upload(i, record)
            else:  # gone or damaged since it was rendered: rendered again below, never uploaded as it is
                for path in (shard, unit_record(stage, i)):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
        todo = [(units[i], i, stage) for i in mine if not os.path.exists(unit_record(stage, i))]
        _render_share(spec, len(units), todo, url, url, task, workers, model_path, cfg, tokenizer, progress, upload)
        if me != 0:
            return Prepared(spec, stage, {}, False)
        records = publish.wait_for_units(url, len(units), wait_s)
        if isinstance(records, dict):  # published meanwhile by another node preparing the same source
            return Prepared(spec, publish.fetch(url, records, checksums), records, True)
        m = merge_records(records, meta(t0))
        m = publish.publish_manifest(url, {"format": PREPARED_FORMAT, "version": FORMAT_VERSION, **m})
    _done(spec, m, cfg, t0, progress)
    return Prepared(spec, publish.fetch(url, m, checksums), m, False)


def _render_share(spec: SourceSpec, n_units: int, todo: list, target: str, notes: str, task: tuple[int, int],
                  workers: int, model_path: str, cfg: Config, tokenizer, progress: bool, after=None) -> None:
    """This task's units rendered (after(index, record) as each one finishes); a failure of one task of
    several is noted in `notes` (failed-task<N>.txt) for task 0, which waits for them all."""
    me, tasks = task
    if progress:
        log(f"preparing {spec.label}: {n_units} unit(s), {len(todo)} for this task, "
            f"{min(workers, max(len(todo), 1))} worker(s) -> {remote.shown(target)}")
    try:
        run_units(todo, workers, model_path, cfg, tokenizer.get() if isinstance(tokenizer, OnDemand) else tokenizer,
                  progress, after)
    except BaseException as e:
        if tasks > 1:
            publish.note_failure(notes, me, str(e))
        raise


def _wait_for_units(partial: str, n: int, wait_s: float) -> None:
    """Task 0 of a multi-task prepare: wait until every unit is recorded, or a task failed."""
    deadline = time.time() + wait_s
    while True:
        failed = sorted(f for f in os.listdir(partial) if f.startswith("failed-task"))
        if failed:
            with open(os.path.join(partial, failed[0]), encoding="utf-8") as f:
                raise DataError(f"prepare {failed[0][7:-4]} failed: {f.read()}")
        missing = [i for i in range(n) if not os.path.exists(unit_record(partial, i))]
        if not missing:
            return
        if time.time() > deadline:
            raise DataError(f"{partial}: after {wait_s:.0f} s, {len(missing)} unit(s) are still not prepared "
                            f"(first: {missing[0]}); is every prepare task running? Run prepare again to resume")
        time.sleep(1.0)


def default_workers(cfg: Config) -> int:
    return cfg.data.prepare_workers or max(1, min(os.cpu_count() or 1, 16))


def ensure_prepared(cfg: Config, tokenizer, model_path: str, workers: int | None = None,
                    task: tuple[int, int] = (0, 1), progress: bool = True, checksums: bool = True) -> list[Prepared]:
    """Every source of data.train, prepared (or found prepared)."""
    specs = train_specs(cfg.data)  # validated by load_config; the first prepare_source checks data.prepared_dir
    # against every source (training and validation) before anything is written
    workers = workers or default_workers(cfg)
    return [prepare_source(s, cfg, tokenizer, model_path, workers, task, progress, checksums=checksums)
            for s in specs]


def ensure_eval_prepared(cfg: Config, tokenizer, model_path: str, workers: int | None = None,
                         task: tuple[int, int] = (0, 1), progress: bool = True, checksums: bool = True) -> Prepared | None:
    """data.eval when it names a source (a fraction is held out of the training sources instead)."""
    if not isinstance(cfg.data.eval, str):
        return None
    spec = SourceSpec(cfg.data.eval, name="eval", layout=config_layout(cfg.data))
    return prepare_source(spec, cfg, tokenizer, model_path, workers or default_workers(cfg), task, progress,
                          checksums=checksums)


def main(argv: list[str] | None = None) -> int:
    ap = recipe_parser(__doc__)
    ap.add_argument("--workers", type=positive(int), default=None,
                    help="worker processes (default: data.prepare_workers)")
    ap.add_argument("--tasks-from-env", action="store_true",
                    help="one of several tasks (launch/prepare.sh under srun/mpirun): take a share of the units")
    ap.add_argument("--wait", type=positive(float), default=86400, help="task 0: seconds to wait for the other tasks")
    ap.add_argument("--check-reference", action="store_true",
                    help=f"exit with status {UNSCORED} when stats.reference is set and a source has no reference "
                         "losses yet (launch/train.sh then runs resure-ds score)")
    a = ap.parse_intermixed_args(argv)

    def body() -> int:
        cfg = load_config(*split_recipe_args(a.args))
        model_path = resolve_model_path(cfg.model.path)
        # loaded only if a source is prepared now: a cache hit needs its fingerprints alone
        tok = OnDemand(model_path, cfg.model.chat_template, cfg.model.trust_remote_code)
        task = task_of_env() if a.tasks_from_env else (0, 1)
        train = ensure_prepared(cfg, tok, model_path, a.workers, task)
        found = train + [p for p in [ensure_eval_prepared(cfg, tok, model_path, a.workers, task)] if p is not None]
        for p in found:
            if p.hit:
                log(f"{p.spec.label}: ready (cache hit) at {p.folder}")
            print(p.folder)
        if a.check_reference and cfg.stats.reference is not None:
            if not all(scored_keys(cfg, model_path, [p for p in train if p.manifest])[3]):
                return UNSCORED
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
