"""The turn audit: every trained turn's verdict, per rank, as Parquet segments.

    <run>/audit/rank00000-seg000000.parquet   rank 0's rows, in the order it trained them
                rank00000-seg000001.parquet   ...

One row per turn per optimizer step that trained it (a turn seen in two epochs has two rows):

    source        the data.train label it came from
    dialogue_id   the record's id (or file:line)
    turn          assistant message index within the dialogue (= turn depth)
    loss          the turn's mean token NLL when it was trained
    z             its z-score against the statistics of its bucket (null before warm-up/sft)
    weight        the weight it was trained with
    warm          the method's weighting was past its warm-up
    step          the optimizer step that trained it
    partial       data.max_length cut the turn
    rank          the rank that trained it
    ref_loss      the reference model's loss of the turn (stats.reference; null without): the
                  statistics and z saw loss - ref_loss
    data_weight   the records' weight of the turn (train/weight keys, 1 by default)
    z_loss        the z of its loss (null where stats.signals leaves the loss out, or before warm-up)
    z_excess      the z of its excess loss (null where stats.signals leaves it out, or before warm-up);
                  with both signals, z is the one of the signal that gave the weight
    source_weight its source's weight under data.mixture=adaptive (1 under fixed): its loss trained
                  with weight * source_weight * data_weight

Rows are buffered in memory and written as a new segment every FLUSH_ROWS rows
and at every checkpoint save, so memory stays bounded on any corpus and the
log costs about 20 bytes per trained turn on disk. A resume from step S first
drops the rows of steps after S (written by the run that died), so the log
always matches the training that the model went through, on any number of ranks.
"""
from __future__ import annotations

import glob
import os
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import DataError

FLUSH_ROWS = 65536
SCHEMA = pa.schema([
    ("source", pa.string()), ("dialogue_id", pa.string()), ("turn", pa.int32()), ("loss", pa.float64()),
    ("z", pa.float64()), ("weight", pa.float64()), ("warm", pa.bool_()), ("step", pa.int32()),
    ("partial", pa.bool_()), ("rank", pa.int32()), ("ref_loss", pa.float64()), ("data_weight", pa.float64()),
    ("z_loss", pa.float64()), ("z_excess", pa.float64()), ("source_weight", pa.float64()),
])
_NAME = re.compile(r"rank(\d{5})-seg(\d{6})\.parquet$")


def segments(run_dir: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(run_dir, "audit", "*.parquet")) if _NAME.search(p))


class AuditLog:
    """This rank's writer: add() rows, flush() at checkpoints (and by itself every FLUSH_ROWS)."""

    def __init__(self, run_dir: str, rank: int, flush_rows: int = FLUSH_ROWS):
        self.dir, self.rank, self.flush_rows = os.path.join(run_dir, "audit"), rank, flush_rows
        self.rows: list[dict] = []

    def add(self, rows: list[dict]) -> None:
        self.rows += [{**r, "rank": self.rank} for r in rows]
        if len(self.rows) >= self.flush_rows:
            self.flush()

    def _next_segment(self) -> str:
        mine = [int(m.group(2)) for p in glob.glob(os.path.join(self.dir, f"rank{self.rank:05d}-seg*.parquet"))
                if (m := _NAME.search(p))]
        return os.path.join(self.dir, f"rank{self.rank:05d}-seg{max(mine, default=-1) + 1:06d}.parquet")

    def flush(self) -> None:
        if not self.rows:
            return
        os.makedirs(self.dir, exist_ok=True)
        _write(self._next_segment(), pa.Table.from_pylist(self.rows, schema=SCHEMA))
        self.rows = []


def _write(path: str, table: pa.Table) -> None:
    tmp = path + ".tmp"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)  # a reader never sees half a segment


def truncate(run_dir: str, step: int) -> int:
    """Drop the rows of steps after `step` (rank 0, before training resumes from `step`; 0 for a
    fresh start in a used folder). Returns how many rows were dropped."""
    dropped = 0
    for p in segments(run_dir):
        steps = read_segment(p, columns=["step"]).column("step")
        if pc.max(steps).as_py() <= step:
            continue
        t = read_segment(p)
        keep = t.filter(pc.less_equal(t.column("step"), step))
        dropped += t.num_rows - keep.num_rows
        if keep.num_rows:
            _write(p, keep)
        else:
            os.remove(p)
    for p in glob.glob(os.path.join(run_dir, "audit", "*.tmp")):
        os.remove(p)  # a segment whose writer was killed
    return dropped


def read_segment(path: str, **kw) -> pa.Table:
    """One audit segment (pq.read_table's arguments); a damaged one is one DataError naming it."""
    try:
        return pq.read_table(path, **kw)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable audit segment ({e}); segments are written whole, so the file was "
                        "damaged or replaced: restore it, or move it out of audit/ (its turns leave the report)") from None


def segment_rows(path: str) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowInvalid, OSError):
        return read_segment(path).num_rows  # the same error, named


def read_audit(run_dir: str, columns: list[str] | None = None) -> pa.Table:
    """All ranks' rows (any order across ranks; within a rank, training order)."""
    parts = [read_segment(p, columns=columns) for p in segments(run_dir)]
    if not parts:
        return SCHEMA.empty_table() if columns is None else pa.schema([SCHEMA.field(c) for c in columns]).empty_table()
    return pa.concat_tables(parts)
