"""ReSURE's verdict on the corpus, from a run's audit: per turn, per source, per depth; exported
as Parquet, or applied to the corpus as a filter.

    python -m resure_ds.report RUN --export verdict.parquet
    python -m resure_ds.report RUN --filter OUT --min-weight 0.5 [--unit dialogue|turn]

A turn's verdict is its *last-seen* row: the weight and z it had the last time it was trained.
Weights are relative to the model at the time it saw the turn (a turn that looked unreliable at
step 10 might not at step 10,000), so a filter built from one run is a judgement of that run's
model, not an absolute score of the data.
"""
from __future__ import annotations

import gzip
import json
import os
import sys
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ..config.parse import train_specs
from ..data.records import InvalidRecord, dialogue_id, raw_source, record_format, to_dialogue
from ..data.sources import load_hf, read_unit, resolve, source_fingerprint, units_of
from ..errors import ConfigError, DataError
from ..files import atomic, check_target, input_root, run_entries
from ..stats.sources import metric_names
from .run_files import iter_metrics, read_config, read_sources, share_names
from .scan import DialogueVerdicts, verdict_parts


def export(run_dir: str, path: str) -> int:
    """Write the last-seen verdict of every trained turn as Parquet; returns the number of turns. A run
    of several sources also gets <path stem>.sources.parquet: per step and source, its share, its
    reliability and its turns so far (the metrics' source_share/ and source/ values)."""
    shares = source_tables(run_dir, _labels(run_dir)) \
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else None
    guard = protected(run_dir)
    for out in [path] + ([sources_path(path)] if shares is not None else []):
        check_target(out, guard, "--export", "write the verdict to a new file: none of the run's own files "
                     "and none of the training data")
        if os.path.isdir(out):
            raise ConfigError(f"--export {out}: is a folder; give the path of a .parquet file to write")
    turns = _write_parquet(verdict_parts(run_dir), path)
    if shares is not None:
        _write_parquet(shares, sources_path(path))
    return turns


def protected(run_dir: str) -> dict[str, str]:
    """What a command on a run's results must not write onto, into or around: the entries of the run
    folder, and the run's inputs (each source's files and folder, as far as they can still be found)."""
    out = run_entries(run_dir)
    for name, files in (read_sources(run_dir) or {}).items():  # absolute paths, as the run read them
        what = f"an input of this run (source {name})"
        paths = [f[0] for f in files]
        out.update({f: what for f in paths})
        if len(paths) > 1:
            out[os.path.commonpath(paths)] = what
    try:
        cfg = read_config(run_dir)
    except (OSError, ValueError):
        return out
    out.update(_local_inputs(cfg))
    try:
        specs = train_specs(cfg["data"])
    except (OSError, ValueError, KeyError, TypeError):
        return out
    found = []
    for spec in specs:
        try:
            found.append((spec, resolve(spec)))
        except (OSError, ValueError):
            continue
    return _guard_inputs(out, found)


def _local_inputs(cfg: dict) -> dict[str, str]:
    """The run's other inputs where they are local paths: the model and the reference model (folders),
    the validation source (a file, a folder, or a glob's root)."""
    out = {}
    for section, key in (("model", "path"), ("stats", "reference"), ("data", "eval")):
        part = cfg.get(section)
        value = part.get(key) if isinstance(part, dict) else None
        if isinstance(value, str) and value != "base" and os.path.exists(input_root(value)):
            out[os.path.abspath(input_root(value))] = f"an input of this run ({section}.{key})"
    return out


def _guard_inputs(guard: dict[str, str], sources: list) -> dict[str, str]:
    """guard, with each (spec, resolved source)'s files and the folder (or a glob's root) it was read
    from; the embedded corpus is no one's to overwrite, so it is left out."""
    for spec, src in sources:
        if src.kind == "chitchat":
            continue
        what = f"an input of this run (source {spec.label})"
        guard.update({f: what for f in src.files})
        if os.path.isdir(input_root(src.spec.path)):
            guard[input_root(src.spec.path)] = what
    return guard


def sources_path(path: str) -> str:
    """Where --export PATH puts the per-step source table."""
    stem = path[:-len(".parquet")] if path.endswith(".parquet") else path
    return stem + ".sources.parquet"


def _labels(run_dir: str) -> list[str]:
    """The run's source labels (data.train order), as the audit and the verdict name them."""
    try:
        return [s.label for s in train_specs(read_config(run_dir)["data"])]
    except (OSError, ValueError, KeyError):
        return []


SOURCE_SCHEMA = pa.schema([("step", pa.int32()), ("source", pa.string()), ("share", pa.float64()),
                           ("reliability", pa.float64()), ("turns", pa.int64())])


def source_tables(run_dir: str, labels: list[str] | None = None) -> Iterator[pa.Table] | None:
    """step, source, share, reliability, turns: one row per step and source, in tables of about
    100,000 rows read as they are written (None for a run of one source). The metrics name a source
    by its metric-safe name; `labels` (data.train order) map them back."""
    last: dict = {}
    for last in iter_metrics(run_dir):
        pass
    names = share_names(last)
    if len(names) < 2:
        return None
    label = dict(zip(metric_names(labels), labels)) if labels else {}

    def tables() -> Iterator[pa.Table]:
        rows: list[dict] = []
        for m in iter_metrics(run_dir):
            rows.extend({"step": m["step"], "source": label.get(n, n), "share": m.get(f"source_share/{n}"),
                         "reliability": m.get(f"source/{n}/reliability"), "turns": m.get(f"source/{n}/turns")}
                        for n in names)
            if len(rows) >= 100_000:
                yield pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)
    return tables()


def _write_parquet(tables, path: str) -> int:
    """The tables (one schema) as one Parquet file, in their order; returns the rows written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows = 0
    with atomic(path) as tmp:  # never a torn file under the final name, no temporary left on failure
        writer = None
        try:
            for t in tables:
                writer = writer or pq.ParquetWriter(tmp, t.schema, compression="zstd")
                writer.write_table(t)
                rows += t.num_rows
        finally:
            if writer is not None:
                writer.close()
    return rows


# -- applying the verdict to the corpus ------------------------------------------------------------
def _verdict_by_dialogue(run_dir: str, min_weight: float) -> DialogueVerdicts:
    """From one read of the audit, part by part: per (source, dialogue_id) trained, its first turn whose
    last-seen weight is below min_weight."""
    verdicts = DialogueVerdicts(min_weight)
    for v in verdict_parts(run_dir):
        verdicts.add(v)
    return verdicts.done()


def _cut(record: dict, messages: list[dict], turn: int, layout) -> dict | None:
    """The record (whose normalised `messages` these are) up to its last assistant message before
    turn `turn` (the user message that asked for turn `turn` goes too); None if no assistant turn
    is left."""
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    fmt = record_format(record, layout)
    if turn == 0 or fmt not in ("openai", "sharegpt"):
        return None  # (Alpaca and prompt-completion records: one reply, or no list to cut)
    key = layout.col("messages" if fmt == "openai" else "conversations")
    return {**record, key: record[key][:idx[turn - 1] + 1]}


class _Writer:
    """Records out, streamed, in the layout of the file they came from (.jsonl, .jsonl.gz, .json,
    .parquet); a `datasets` folder as a `datasets` folder (the kept rows selected from it)."""

    def __init__(self, path: str, like: str, kind: str):
        self.path, self.like, self.kind = path, like, kind
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.rows, self.f, self.pq = [], None, None
        if kind == "hf":
            self.keep, self.replace = [], {}
        elif like.endswith(".parquet"):
            self.schema = pq.read_schema(like)
            self.pq = pq.ParquetWriter(path, self.schema)
        elif not like.endswith(".json"):
            self.f = (gzip.open if path.endswith(".gz") else open)(path, "wt", encoding="utf-8")

    def add(self, rec, index: int, changed: bool) -> None:
        if self.kind == "hf":
            self.keep.append(index)
            if changed:
                self.replace[index] = rec
        elif self.f is not None:
            self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            self.rows.append(rec)
            if self.pq is not None and len(self.rows) >= 1024:
                self._flush_parquet()

    def _flush_parquet(self) -> None:
        if self.rows:
            self.pq.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        if self.kind == "hf":
            ds = load_hf(self.like)
            if self.replace:
                ds = ds.map(lambda r, i: self.replace.get(i, r), with_indices=True)
            ds.select(self.keep).save_to_disk(self.path)
        elif self.pq is not None:
            self._flush_parquet()
            self.pq.close()
        elif self.f is not None:
            self.f.close()
        else:
            with open(self.path, "w", encoding="utf-8") as f:
                json.dump(self.rows, f, ensure_ascii=False)


def filter_corpus(run_dir: str, out_dir: str, min_weight: float, unit: str = "dialogue") -> dict:
    """Write the run's training corpus without the dialogues (unit=dialogue) holding a turn whose
    last-seen weight is below min_weight, or (unit=turn) with each such dialogue cut before its
    first such turn (the later turns were trained on it as context); a cut dialogue with no
    assistant turn left is dropped. Records the run never trained, or that were invalid, are kept
    as they are. One output per input file, in its format; the embedded corpus as OpenAI-layout
    JSONL. Returns the counts (also written to OUT/filter_counts.json)."""
    if unit not in ("dialogue", "turn"):
        raise ConfigError(f"--unit must be 'dialogue' or 'turn', got {unit!r}")
    cfg = read_config(run_dir)
    sources = [(spec, raw_source(spec)) for spec in train_specs(cfg["data"])]
    _check_output(out_dir, run_dir, sources)
    _check_unchanged(run_dir, sources)
    final = os.path.realpath(out_dir)  # a link to an empty folder: the folder it names is replaced
    with atomic(final) as partial:  # renamed when complete; removed on any failure
        counts = _filter_into(run_dir, partial, final, sources, min_weight, unit)
    return counts


def _filter_into(run_dir: str, out_dir: str, final: str, sources: list, min_weight: float, unit: str) -> dict:
    """The filter's work, into out_dir (renamed to final, an empty folder or none, when done)."""
    verdicts = _verdict_by_dialogue(run_dir, min_weight)
    counts = {"min_weight": min_weight, "unit": unit, "records": 0, "kept": 0, "dropped": 0, "cut": 0,
              "turns_removed": 0, "not_trained_kept": 0, "invalid_kept": 0,
              "unreadable_dropped": 0, "outputs": []}
    for i, (spec, src) in enumerate(sources):
        folder = os.path.join(out_dir, f"{i:02d}-{_slug(spec.label)}")
        w, w_path = None, None
        for u in units_of(src):
            if u.path != w_path:  # a file's units come together: its output is closed when they are done
                _close(w, counts, final, out_dir)
                w, w_path = _Writer(_out_path(src, u.path, folder), u.path if src.kind != "chitchat" else "x.jsonl",
                                    src.kind), u.path
            for index, (where, rec) in enumerate(read_unit(u), start=u.start if src.kind == "hf" else 0):
                counts["records"] += 1
                trained, t = verdicts.lookup(spec.label, dialogue_id(u, where, rec))  # to_dialogue's id
                if trained and t is None:
                    counts["kept"] += 1  # trained, no low turn: kept as it is, without validating it again
                    w.add(rec, index, False)
                    continue
                try:
                    d = to_dialogue(u, where, rec)
                except InvalidRecord:
                    if isinstance(rec, InvalidRecord):  # a line that is not JSON cannot be written back
                        counts["unreadable_dropped"] += 1
                    else:
                        counts["invalid_kept"] += 1
                        w.add(rec, index, False)
                    continue
                if not trained:
                    counts["not_trained_kept"] += 1
                    w.add(rec, index, False)
                    continue
                n_turns = sum(m["role"] == "assistant" for m in d.messages)
                kept = _cut(rec, d.messages, t, u.layout) if unit == "turn" else None
                counts["turns_removed"] += n_turns - (t if kept is not None else 0)
                if kept is None:
                    counts["dropped"] += 1
                else:
                    counts["cut"] += 1
                    w.add(kept, index, True)
        _close(w, counts, final, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "filter_counts.json"), "w", encoding="utf-8") as f:
        json.dump(counts, f, indent=1)
    return counts


def _close(w: _Writer | None, counts: dict, final: str, out_dir: str) -> None:
    if w is not None:
        w.close()
        counts["outputs"].append(os.path.join(final, os.path.relpath(w.path, out_dir)))


def _check_unchanged(run_dir: str, sources: list) -> None:
    """The verdict names records by id, or by file:line where they have none: applied to a file
    edited since the run (a line inserted), it would drop the wrong records. Refuse a source whose
    files differ from the fingerprints the run recorded."""
    recorded = read_sources(run_dir)
    if recorded is None:
        print(f"[resure_ds] warning: {run_dir} holds no sources.json (the fingerprints a run writes when it "
              "starts): the filter cannot check that the sources are unchanged since it trained", file=sys.stderr)
        return
    for spec, src in sources:
        was = {f[0]: f for f in recorded.get(spec.label, [])}
        now = {f[0]: f for f in source_fingerprint(src)}
        changed = [p for p in sorted(was.keys() | now.keys()) if was.get(p) != now.get(p)]
        if changed:
            p = changed[0]
            what = ("is new" if p not in was else "is gone" if p not in now else
                    f"has {now[p][1]} bytes (the run read {was[p][1]})" if was[p][1] != now[p][1] else
                    "was modified (another mtime or content)")
            raise DataError(f"{p} {what} since the run trained on source {spec.label}"
                             f"{f' ({len(changed)} files differ)' if len(changed) > 1 else ''}: its verdict "
                             "names records of the files as they were; filter the files the run read, or train "
                             "on the edited ones")


def _check_output(out_dir: str, run_dir: str, sources: list) -> None:
    """The filter never writes over, into or around an input of the run or the run's own files, nor into
    a used folder: its output would replace a source, or be read back as one by the next prepare."""
    guard = _guard_inputs({**run_entries(run_dir), **_local_inputs(read_config(run_dir))}, sources)
    check_target(out_dir, guard, "--filter", "write the filtered corpus to a new folder: not among the run's "
                 "own files and not in the training data")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ConfigError(f"--filter {out_dir}: exists and is not an empty folder (an earlier filter's output?); "
                         "give a new folder, or remove this one first")


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label.strip("/"))[-60:] or "source"


def _out_path(src, path: str, folder: str) -> str:
    if src.kind == "chitchat":
        return os.path.join(folder, "chitchat.jsonl")
    if src.kind == "hf":
        return os.path.join(folder, os.path.basename(path.rstrip("/")))
    base = os.path.commonpath(src.files) if len(src.files) > 1 else os.path.dirname(src.files[0])
    return os.path.join(folder, os.path.relpath(path, base))
