"""Prepared token shards: Arrow IPC files, memory-mapped for training.

One shard per unit of input (see sources.py), record batches of up to 1,024
rows, one row per dialogue (several for a dialogue that data.overflow=split
made into windows, each with the dialogue's id):

  dialogue_id  string
  input_ids    list<int32>   the rendering's tokens (a window of them), at most max_length
  turns        list<int32>   turn id (assistant message index in the dialogue) of each trained span
  turn_starts  list<int32>   token offset where the span starts
  turn_ends    list<int32>   ... and ends (exclusive)
  span_weights list<float32> data weight of each trained span's turn (records.py; 1 by default)
  last_partial bool          the last span was cut by max_length
  length       int32         len(input_ids)

beside a manifest.json (format, fingerprints, counts, shard list). Training
maps the files and reads only the rows it trains on: a row is an offset
lookup and a slice of the mapped buffer, whatever the corpus size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .manifest import read_manifest
from .render import Example
BATCH_ROWS = 1024
SCHEMA = pa.schema([
    ("dialogue_id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("turns", pa.list_(pa.int32())),
    ("turn_starts", pa.list_(pa.int32())),
    ("turn_ends", pa.list_(pa.int32())),
    ("span_weights", pa.list_(pa.float32())),
    ("last_partial", pa.bool_()),
    ("length", pa.int32()),
])


def spans(turn_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token turn ids (-1 untrained) -> (turn, start, end) of each contiguous trained span."""
    idx = np.flatnonzero(turn_ids >= 0)
    if not len(idx):
        return (np.zeros(0, np.int32),) * 3
    t = turn_ids[idx]
    first = np.r_[True, (t[1:] != t[:-1]) | (idx[1:] != idx[:-1] + 1)]
    last = np.r_[first[1:], True]
    return t[first].astype(np.int32), idx[first].astype(np.int32), (idx[last] + 1).astype(np.int32)


class ShardWriter:
    """Appends Examples to one shard; the file appears complete (rename) on close()."""

    def __init__(self, path: str):
        self.path, self.tmp = path, f"{path}.tmp{os.getpid()}"
        self.writer = pa.ipc.new_file(self.tmp, SCHEMA)
        self.rows: list[Example] = []
        self.rows_written = self.tokens = self.trained = self.partial = 0

    def add(self, ex: Example) -> None:
        self.rows.append(ex)
        self.rows_written += 1
        self.tokens += len(ex.input_ids)
        self.trained += int((ex.turn_ids >= 0).sum())
        self.partial += bool(ex.partial.any())
        if len(self.rows) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        sp = [spans(e.turn_ids) for e in self.rows]
        cols = [
            pa.array([e.dialogue_id for e in self.rows], pa.string()),
            _list([e.input_ids for e in self.rows]),
            _list([s[0] for s in sp]), _list([s[1] for s in sp]), _list([s[2] for s in sp]),
            _list([np.ones(len(s[0]), np.float32) if e.weights is None else e.weights[s[0]]
                   for e, s in zip(self.rows, sp)], np.float32),
            pa.array([bool(e.partial.any()) for e in self.rows], pa.bool_()),
            pa.array([len(e.input_ids) for e in self.rows], pa.int32()),
        ]
        self.writer.write_batch(pa.record_batch(cols, schema=SCHEMA))
        self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()
        os.replace(self.tmp, self.path)


def _list(arrays: list[np.ndarray], dtype=np.int32) -> pa.ListArray:
    lens = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    values = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


# -- reading ---------------------------------------------------------------------------
@dataclass
class Row:
    dialogue_id: str
    input_ids: np.ndarray   # [n] int32 (a view of the mapped file)
    turn_ids: np.ndarray    # [n] int32, -1 untrained
    partial: np.ndarray     # [turns] bool
    weights: np.ndarray | None = None   # [turns] float32: data weights (1 where the records give none)
    ref_loss: np.ndarray | None = None  # [turns] float32: the reference model's loss per turn (stats.reference)


class _Chunk:
    """One record batch as zero-copy numpy views."""

    def __init__(self, batch: pa.RecordBatch):
        def lst(name):
            col = batch.column(name)
            return col.offsets.to_numpy(), col.values.to_numpy()

        self.ids = batch.column("dialogue_id")
        self.tok_off, self.tok = lst("input_ids")
        self.span_off, self.turns = lst("turns")
        _, self.starts = lst("turn_starts")
        _, self.ends = lst("turn_ends")
        _, self.span_weights = lst("span_weights")
        self.last_partial = batch.column("last_partial").to_numpy(zero_copy_only=False)
        self.length = batch.column("length").to_numpy()

    def row(self, i: int) -> Row:
        ids = self.tok[self.tok_off[i]:self.tok_off[i + 1]]
        a, b = self.span_off[i], self.span_off[i + 1]
        turns, starts, ends = self.turns[a:b], self.starts[a:b], self.ends[a:b]
        turn_ids = np.full(len(ids), -1, dtype=np.int32)
        for t, s, e in zip(turns.tolist(), starts.tolist(), ends.tolist()):
            turn_ids[s:e] = t
        n_turns = int(turns.max()) + 1 if len(turns) else 0
        partial = np.zeros(n_turns, dtype=bool)
        if self.last_partial[i] and n_turns:
            partial[n_turns - 1] = True
        sw, weights = self.span_weights[a:b], None
        if (sw != 1).any():
            weights = np.ones(n_turns, dtype=np.float32)
            weights[turns] = sw
        return Row(self.ids[i].as_py(), ids, turn_ids, partial, weights)


class PreparedSource:
    """Memory-mapped prepared folder: len(), lengths (int32 per dialogue) and row(i)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.manifest = read_manifest(folder)
        self.chunks: list[_Chunk] = []
        for shard in self.manifest["shards"]:
            reader = pa.ipc.open_file(pa.memory_map(os.path.join(folder, shard["file"])))
            self.chunks += [_Chunk(reader.get_batch(b)) for b in range(reader.num_record_batches)]
        sizes = np.array([len(c.length) for c in self.chunks], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.lengths = (np.concatenate([c.length for c in self.chunks]) if self.chunks
                        else np.zeros(0, np.int32))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def dialogue_ids(self) -> list[str]:
        return [x for c in self.chunks for x in c.ids.to_pylist()]

    def row(self, i: int) -> Row:
        c = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.chunks[c].row(int(i - self.offsets[c]))
