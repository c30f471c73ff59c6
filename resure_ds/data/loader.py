"""This rank's micro-batches from prepared shards, assembled in background workers.

Every rank (and every loader worker) walks the same global row stream
(plan.py), materialises only its own rows from the memory-mapped shards and
collates them. With data.num_workers > 0 the batches are built by that many
processes (torch DataLoader, prefetching data.prefetch batches each) and
the training loop only moves tensors; worker j builds micro-steps m with
m % num_workers == j, and the DataLoader hands them out in order.
Each batch carries `cursor`: the global position after its micro-step,
which is what a checkpoint saves.
"""
from __future__ import annotations

import functools
import signal
from multiprocessing import resource_tracker
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..errors import DataError
from .collate import collate
from .holdout import held_out
from .order import Cursor, Plan
from .reference import ReferenceLosses
from .shards import PreparedSource


class Corpus:
    """Several prepared sources as one index space (source order = data.train order); with
    `references` (per source the key of its reference losses, stats.reference), every row carries
    its turns' reference losses."""

    def __init__(self, folders: list[str], references: list[str] | None = None):
        self.sources = [PreparedSource(f) for f in folders]
        self.refs = [ReferenceLosses(f, k) for f, k in zip(folders, references)] if references else None
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.sources])]).astype(np.int64)

    def lengths(self) -> list[np.ndarray]:
        return [s.lengths for s in self.sources]

    def row(self, i: int):
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        row = self.sources[s].row(int(i - self.offsets[s]))
        if self.refs is not None:
            row.ref_loss = self.refs[s].turns(int(i - self.offsets[s]))
            trained = np.unique(row.turn_ids[row.turn_ids >= 0])
            if len(row.ref_loss) != len(row.partial) or not np.isfinite(row.ref_loss[trained]).all():
                raise DataError(f"{self.refs[s].folder}: dialogue {row.dialogue_id} has no reference loss for "
                                "every trained turn (the scores do not match the shards); delete the folder and "
                                "score again (resure-ds score RECIPE)")
        return s, row

    def split(self, fraction: float) -> tuple[list[np.ndarray], np.ndarray]:
        """(per source: local indices kept for training; global indices held out for validation)."""
        keep, out = [], []
        for s, src in enumerate(self.sources):
            mask = held_out(src.dialogue_ids(), fraction)
            keep.append(np.flatnonzero(~mask).astype(np.int64))
            out.append(np.flatnonzero(mask).astype(np.int64) + self.offsets[s])
        return keep, np.concatenate(out) if out else np.zeros(0, np.int64)


@dataclass(frozen=True)
class Stream:
    """What the global row stream is drawn from and how rows are built: the same on every rank."""
    folders: list[str]       # prepared sources, in data.train order
    weights: list[float]     # their mixture weights
    seed: int
    max_length: int
    packing: bool
    window: int              # data.pack_window
    micro_batch: int         # rows per micro-batch and rank
    pad_id: int
    keep: list[np.ndarray] | None = None  # per source, the indices training may draw (held-out split)
    references: list[str] | None = None   # per source, the key of its reference losses (stats.reference)


class RankBatches(torch.utils.data.IterableDataset):
    """Infinite stream of this rank's collated micro-batches from `cursor` on."""

    def __init__(self, stream: Stream, rank: int, world: int, cursor: Cursor):
        super().__init__()
        self.stream, self.rank, self.world, self.cursor = stream, rank, world, cursor

    def plan(self, corpus: Corpus) -> Plan:
        s = self.stream
        return Plan(corpus.lengths(), s.weights, s.seed, s.max_length, s.packing, s.window, s.keep)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        me, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        s = self.stream
        corpus = Corpus(s.folders, s.references)  # opened in the process that iterates: maps are per process
        rows = self.plan(corpus).rows_from(self.cursor)
        per_step = self.world * s.micro_batch
        lo = self.rank * s.micro_batch
        m = 0
        while True:
            step = [next(rows) for _ in range(per_step)]
            if m % workers == me:
                mine = [corpus_rows(corpus, r) for r, _ in step[lo:lo + s.micro_batch]]
                batch = collate([[d for _, d in row] for row in mine], s.pad_id, s.packing,
                                [[s for s, _ in row] for row in mine])
                batch["cursor"] = step[-1][1].to_dict()
                yield batch
            m += 1


def corpus_rows(corpus: Corpus, row: np.ndarray) -> list:
    return [corpus.row(int(i)) for i in row]


def _ignore(signals: tuple, _worker_id: int) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def make_loader(ds: RankBatches, num_workers: int, prefetch: int, pin_memory: bool, ignore_signals: tuple = ()):
    """An iterator of batches; with workers, built ahead in background processes.

    ignore_signals: a scheduler's SIGTERM/SIGUSR1 reaches every process of the job; the training
    process turns it into a checkpoint at the next step (runtime/stop.py), and its loader workers
    must outlive that (they exit with it, or when it dies)."""
    if num_workers == 0:
        return iter(ds)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=num_workers, prefetch_factor=prefetch, pin_memory=pin_memory,
        # spawn: a fresh interpreter maps the shards itself; no fork of a process holding
        # communication threads
        multiprocessing_context="spawn", persistent_workers=False, worker_init_fn=functools.partial(_ignore, tuple(ignore_signals)))
    # The workers and multiprocessing's resource tracker (which they register with; it blocks SIGINT
    # and SIGTERM itself, not SIGUSR1) start with the signals blocked, so a signal sent to every
    # process of the job (srun) cannot end them before the worker's init ignores it; the training
    # process gets what arrived meanwhile once they are started.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ignore_signals) if ignore_signals else None
    try:
        resource_tracker.ensure_running()
        return iter(loader)
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
