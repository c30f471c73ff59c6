"""Where the training data is: `data.train` -> sources -> units of work.

A source is one of
  a file            .jsonl, .jsonl.gz, .json or .parquet
  a glob            /data/part-*.parquet (sorted)
  a folder          of such files (searched recursively, sorted), or a folder
                    saved by `datasets` (save_to_disk), or a prepared folder
                    (written by `python -m resure_ds.data.prepare`)
  chitchat          the embedded corpus
and any of the first four in an object store (s3://, gs://, az://, hf://, https://; data/remote.py),
and `data.train` is one source or a list of them, each optionally with a
mixture weight: `[{path: a.jsonl, weight: 3}, {path: /b/*.parquet, weight: 1}]`.

A *unit* is a slice of one input file that one prepare worker reads on its
own: a byte range of a plain JSONL file (64 MiB, cut at line ends), a run of
Parquet row groups, one Arrow file of a datasets folder (streamed), or a whole
.json / .jsonl.gz file. Every record has a location (`file line 12`) used in
errors and, where the record has no `id`, as its dialogue id (`file:12`).
"""
from __future__ import annotations

import contextlib
import functools
import glob as globlib
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

from ..config.parse import Layout, SourceSpec, config_layout, parse_layout, parse_train  # noqa: F401 (re-exported)
from ..errors import DataError, InvalidRecord
from . import remote
from .chitchat import chitchat_count, chitchat_path, chitchat_records

EMBEDDED = "chitchat"
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
UNIT_BYTES = 64 << 20   # plain JSONL files are split into units of about this size
UNIT_ROWS = 65536       # Parquet: rows per unit (whole row groups)
CHITCHAT_UNIT = 2048    # conversations per unit of the embedded corpus
PREPARED_FORMAT = "resure-ds-prepared"


@dataclass(frozen=True)
class Unit:
    fmt: str      # jsonl | jsonl.gz | json | parquet | hf | chitchat
    path: str
    start: int    # byte offset (jsonl), row group (parquet), row (hf, chitchat)
    stop: int
    base: int     # 1-based line (jsonl) or 0-based row/record number of the first record
    layout: Layout = Layout()  # how its records are laid out (the source's)


@dataclass
class Source:
    spec: SourceSpec
    kind: str             # files | hf | chitchat | prepared
    files: list[str]      # input files (fingerprinted); the folder for hf / prepared

    def fingerprint(self) -> list:
        return [file_fingerprint(f) for f in self.files]


def file_fingerprint(path: str) -> list:
    """(path, size, mtime_ns, hash of the first and last 64 KiB): changes when the file does,
    without reading a large file whole. An object in a store: (URL, size, its ETag or the like)."""
    if remote.is_url(path):
        return remote.fingerprint(path)
    st = os.stat(path)
    with open(path, "rb") as f:
        return [os.path.abspath(path), st.st_size, st.st_mtime_ns, remote.head_tail_digest(f, st.st_size)]


def _data_files(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith(SUFFIXES)]
    return out


def is_prepared(path: str) -> bool:
    if remote.is_url(path):
        m = remote.join(path, "manifest.json")
        if not remote.exists(m):
            return False
        try:
            return json.loads(remote.read_bytes(m)).get("format") == PREPARED_FORMAT
        except (ValueError, AttributeError):
            return True  # damaged: read_manifest names it
    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            return json.load(f).get("format") == PREPARED_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _resolve_url(spec: SourceSpec, fix: str) -> Source:
    """A source in an object store: an object, a glob over objects, a folder of them or a prepared
    folder (a datasets folder is read from a local disk: copy it there)."""
    p = remote.normal(spec.path)
    url = p.rstrip("/")
    if url.endswith(SUFFIXES) and remote.isfile(url):  # an object, even where a "folder" of that name exists
        return Source(spec, "files", [url])
    if any(c in p for c in "*?["):
        files = [f for f in remote.glob(p) if f.endswith(SUFFIXES)]
        if not files:
            raise DataError(f"{remote.shown(p)}: the glob matches no {'/'.join(SUFFIXES)} object. {fix}")
        return Source(spec, "files", files)
    if remote.isdir(url):
        if is_prepared(url):
            return Source(spec, "prepared", [url])
        files = remote.walk_files(url)
        if any(f.rsplit("/", 1)[-1] in ("state.json", "dataset_info.json") for f in files):
            raise DataError(f"{remote.shown(p)}: a datasets folder in an object store; copy it to a local disk "
                            "(or save it as .parquet files there)")
        if any(re.search(r"/units/\d+\.json$", f) for f in files) and any(f.endswith(".arrow") for f in files):
            raise DataError(f"{remote.shown(p)}: holds a prepared folder's shards and unit records (units/*.json) "
                            "but no manifest.json: an unfinished publication (run prepare again to finish it), or a "
                            "folder with prepared folders below it (give one of them, or the raw source, not a "
                            "folder that holds both)")
        files = [f for f in files if f.endswith(SUFFIXES)]
        if not files:
            raise DataError(f"{remote.shown(p)}: the folder holds no {'/'.join(SUFFIXES)} object. {fix}")
        return Source(spec, "files", files)
    if not remote.exists(url):
        raise DataError(f"{remote.shown(p)}: no such object or folder in the store. {fix}")
    if not url.endswith(SUFFIXES):
        raise DataError(f"{remote.shown(p)}: unknown file type; use .jsonl, .jsonl.gz, .json or .parquet")
    return Source(spec, "files", [url])


def resolve(spec: SourceSpec) -> Source:
    """A spec -> the files behind it; a missing or empty source is a DataError naming it."""
    p = remote.local(spec.path)
    fix = ("Set data.train to a .jsonl/.jsonl.gz/.json/.parquet file, a glob, a folder of such files, "
           "a saved datasets folder, a prepared folder, or 'chitchat'")
    if p == EMBEDDED:
        return Source(spec, "chitchat", [chitchat_path()])
    if remote.is_url(p):
        return _resolve_url(spec, fix)
    if any(c in p for c in "*?["):
        files = sorted(f for f in globlib.glob(p, recursive=True) if f.endswith(SUFFIXES) and os.path.isfile(f))
        if not files:
            raise DataError(f"{p}: the glob matches no {'/'.join(SUFFIXES)} file. {fix}")
        return Source(spec, "files", files)
    if os.path.isdir(p):
        if is_prepared(p):
            return Source(spec, "prepared", [p])
        if any(os.path.exists(os.path.join(p, m)) for m in ("state.json", "dataset_info.json", "dataset_dict.json")):
            if os.path.exists(os.path.join(p, "dataset_dict.json")):
                splits = sorted(d for d in os.listdir(p) if os.path.isdir(os.path.join(p, d)))
                raise DataError(f"{p}: holds splits {splits}; point data.train at one split's folder")
            return Source(spec, "hf", [p])
        files = _data_files(p)
        if not files:
            raise DataError(f"{p}: the folder holds no {'/'.join(SUFFIXES)} file. {fix}")
        return Source(spec, "files", files)
    if not os.path.exists(p):
        raise DataError(f"{p}: no such file or folder. {fix}")
    if not p.endswith(SUFFIXES):
        raise DataError(f"{p}: unknown file type; use .jsonl, .jsonl.gz, .json or .parquet")
    return Source(spec, "files", [p])


def source_fingerprint(src: Source) -> list:
    if src.kind == "hf":
        folder = src.files[0]
        return [file_fingerprint(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
                if os.path.isfile(os.path.join(folder, f))]
    return src.fingerprint()


# -- units ----------------------------------------------------------------------
def _jsonl_units(path: str) -> list[Unit]:
    size = remote.size(path)
    if size <= UNIT_BYTES:
        return [Unit("jsonl", path, 0, size, 1)]
    cuts = [0]
    with remote.store_errors(path), remote.open_binary(path) as f:
        while cuts[-1] + UNIT_BYTES < size:
            f.seek(cuts[-1] + UNIT_BYTES)
            f.readline()  # to the next line end
            if f.tell() >= size:
                break
            cuts.append(f.tell())
        cuts.append(size)
        units, line = [], 1
        for a, b in zip(cuts, cuts[1:]):
            units.append(Unit("jsonl", path, a, b, line))
            f.seek(a)
            left = b - a
            while left:  # count this unit's lines: the next unit's first line number
                buf = f.read(min(left, 16 << 20))
                line += buf.count(b"\n")
                left -= len(buf)
    return units


def units_of(src: Source) -> list[Unit]:
    """The units of a source, in a fixed order (the prepared row order follows it), each carrying
    the source's layout."""
    import dataclasses

    return [dataclasses.replace(u, layout=src.spec.layout) for u in _units(src)]


def _units(src: Source) -> list[Unit]:
    if src.kind == "chitchat":
        n = chitchat_count(src.files[0])
        return [Unit("chitchat", src.files[0], a, min(a + CHITCHAT_UNIT, n), a) for a in range(0, n, CHITCHAT_UNIT)]
    if src.kind == "hf":  # one unit per Arrow file of the folder, its rows numbered across the folder
        return [Unit("hf", src.files[0], first, first + rows, first) for _, first, rows in hf_files(src.files[0])
                if rows]
    units = []
    for path in src.files:
        if path.endswith(".jsonl"):
            units += _jsonl_units(path)
        elif path.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                with remote.store_errors(path), remote.open_binary(path) as f:
                    meta = pq.ParquetFile(f).metadata
            except DataError:
                raise
            except Exception as e:
                raise DataError(f"{path}: not a readable Parquet file ({e}). Fix or remove the file") from None
            g, row = 0, 0
            while g < meta.num_row_groups:
                first, rows = g, 0
                while g < meta.num_row_groups and (rows == 0 or rows + meta.row_group(g).num_rows <= UNIT_ROWS):
                    rows += meta.row_group(g).num_rows
                    g += 1
                units.append(Unit("parquet", path, first, g, row))
                row += rows
        else:
            units.append(Unit("jsonl.gz" if path.endswith(".gz") else "json", path, 0, 0, 0))
    return units


# -- reading a unit --------------------------------------------------------------
MAX_RECORD_BYTES = 64 << 20  # one JSONL line; far beyond any dialogue that fits a training row


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


BLANK = object()  # a blank line: not a record (a JSON `null` line is one, and is invalid)


def _parse_line(raw: bytes) -> Any:
    """One JSONL line -> record, BLANK, or an InvalidRecord saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return InvalidRecord("bad_encoding", f"invalid UTF-8 byte {raw[e.start:e.start + 1]!r} at byte {e.start}")
    if not text.strip():
        return BLANK
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        return InvalidRecord("malformed_json", f"malformed JSON ({e.msg} at column {e.colno})")
    except ValueError as e:  # NaN / Infinity: Python's json reads them, no other JSON reader does
        return InvalidRecord("malformed_json", f"malformed JSON ({e})")
    except RecursionError:
        return InvalidRecord("malformed_json", "JSON nested too deeply")


def _lines(f) -> Iterator[tuple[bytes | None, int]]:
    """(line, its length in bytes) of a binary file; None for a line over MAX_RECORD_BYTES, which
    is skipped in bounded pieces instead of being held in memory."""
    while True:
        raw = f.readline(MAX_RECORD_BYTES + 1)
        if not raw:
            return
        if len(raw) <= MAX_RECORD_BYTES or raw.endswith(b"\n"):
            yield raw, len(raw)
            continue
        n = len(raw)
        while raw and not raw.endswith(b"\n"):
            raw = f.readline(1 << 20)
            n += len(raw)
        yield None, n


def _read_jsonl(u: Unit) -> Iterator[tuple[str, Any]]:
    try:
        yield from _jsonl_records(u)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{remote.shown(u.path)}: not a whole gzip file ({e or type(e).__name__}); compress it again "
                        "(gzip FILE.jsonl), or give it uncompressed") from None


def _jsonl_records(u: Unit) -> Iterator[tuple[str, Any]]:
    with remote.store_errors(u.path), remote.open_binary(u.path) as raw_file, \
            (gzip.open(raw_file, "rb") if u.fmt == "jsonl.gz" else contextlib.nullcontext(raw_file)) as f:
        if u.fmt == "jsonl":
            f.seek(u.start)
        pos, line = u.start, u.base
        for raw, n in _lines(f):
            if u.fmt == "jsonl" and pos >= u.stop:
                break
            pos += n
            rec = _parse_line(raw) if raw is not None else InvalidRecord(
                "huge_record", f"the line is {n:,} bytes, over the {MAX_RECORD_BYTES >> 20} MiB a record may take")
            if rec is not BLANK:
                yield f"line {line}", rec
            line += 1


def _read_json(u: Unit) -> Iterator[tuple[str, Any]]:
    raw = remote.read_bytes(u.path)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{remote.shown(u.path)}: not valid UTF-8 JSON ({e}). Fix the file, or store one record per "
                        "line as .jsonl (then a bad line is reported or skipped on its own)") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{remote.shown(u.path)}: a .json file must hold a list of records (or {{'data': [...]}})")
    for i, rec in enumerate(data):
        yield f"record {i}", rec


def _read_parquet(u: Unit) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    row = u.base
    with remote.store_errors(u.path), remote.open_binary(u.path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024, row_groups=range(u.start, u.stop)):
            for rec in batch.to_pylist():
                yield f"row {row}", rec
                row += 1


def load_hf(folder: str):
    import datasets

    try:
        return datasets.load_from_disk(folder)
    except Exception as e:  # datasets raises several types for a folder it cannot read
        raise DataError(f"{folder}: not a dataset saved with datasets' save_to_disk ({e})") from None


def hf_files(folder: str) -> tuple[tuple[str, int, int], ...]:
    """A saved datasets folder's Arrow files, in the dataset's order: (path, its first row across the
    folder, its rows), the rows read off the memory-mapped files' batch headers (no row is decoded).
    Computed once per state of the folder's state.json in a process."""
    try:
        st = os.stat(os.path.join(folder, "state.json"))
    except OSError as e:
        raise DataError(f"{folder}: not a dataset saved with datasets' save_to_disk ({e}); save it again, or "
                        "give its data as .parquet/.jsonl files") from None
    return _hf_files(folder, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _hf_files(folder: str, _mtime_ns: int, _size: int) -> tuple[tuple[str, int, int], ...]:
    import pyarrow as pa

    try:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            names = [d["filename"] for d in json.load(f)["_data_files"]]
        out, first = [], 0
        for name in names:
            with pa.memory_map(os.path.join(folder, name)) as m:
                rows = sum(b.num_rows for b in pa.ipc.open_stream(m))
            out.append((os.path.join(folder, name), first, rows))
            first += rows
        return tuple(out)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowInvalid) as e:
        raise DataError(f"{folder}: not a dataset saved with datasets' save_to_disk ({e}); save it again, or "
                        "give its data as .parquet/.jsonl files") from None


def _read_hf(u: Unit) -> Iterator[tuple[str, Any]]:
    """One Arrow file of a datasets folder, streamed (an IterableDataset: nothing is loaded whole)."""
    import datasets

    path = next(p for p, first, _ in hf_files(u.path) if first == u.start)
    ds = datasets.load_dataset("arrow", data_files=[path], split="train", streaming=True)
    for j, rec in enumerate(ds):
        yield f"row {u.start + j}", rec


def _read_chitchat(u: Unit) -> Iterator[tuple[str, Any]]:
    for key, rec in chitchat_records(u.path, u.start, u.stop):
        yield f"conversation {key}", rec


READERS = {"jsonl": _read_jsonl, "jsonl.gz": _read_jsonl, "json": _read_json, "parquet": _read_parquet,
           "hf": _read_hf, "chitchat": _read_chitchat}


def read_unit(u: Unit) -> Iterator[tuple[str, Any]]:
    """(location within the file, record or InvalidRecord) for every record of the unit."""
    return READERS[u.fmt](u)


def default_id(u: Unit, where: str) -> str:
    """The dialogue id of a record without its own: file name and line/row."""
    if u.fmt == "chitchat":
        return where.split(" ", 1)[1]
    return f"{os.path.basename(u.path.rstrip('/'))}:{where.split()[-1]}"
