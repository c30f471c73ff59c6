"""The order of training: an epoch's seeded permutation, packed into rows, and
a global cursor into the row stream.

Epoch e of a corpus of N dialogues (all sources together) is a list of N
draws: source i supplies its share of N by weight, taken from its own
stream of seeded permutations (so a source is seen whole before any of its
dialogues repeats, and one with more weight than size repeats), and the
draws are shuffled together with a seed of (train.seed, e). Nothing here
depends on the number of ranks.

Rows: the epoch's order is cut into windows of `window` dialogues; with
packing, each window's dialogues are packed into rows of at most
max_length tokens (best-fit decreasing: dense rows), and the rows are
shuffled within the window; without packing, every dialogue is its own row.

A held-out validation split (data.eval as a fraction) enters as `keep`: the
indices of each source that may be drawn; held-out dialogues never are.

Cursor: (epoch, window, rows consumed in the window) and the rows consumed
since the start. Restoring it computes one permutation and one window:
O(1) in the position, no replay. A micro-step takes the next world x
micro_batch rows of the one global row stream and rank k takes the k-th
micro_batch of them, so a job resumed on another number of ranks with the
same global batch trains the same rows in the same order.
"""
from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class Cursor:
    epoch: int = 0
    window: int = 0
    row: int = 0        # rows of this window consumed
    rows_seen: int = 0  # rows consumed since the start of training

    def to_dict(self) -> dict:
        return asdict(self)


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


_ORDER, _DRAW, _ROWS = 1, 2, 3  # seed-stream tags


def quotas(sizes: list[int], weights: list[float]) -> np.ndarray:
    """Draws per source in an epoch of sum(sizes) draws: proportional to weight (largest remainder)."""
    total = sum(sizes)
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.max()  # relative weights: a sum of weights near the float range cannot overflow
    share = w / w.sum() * total
    q = np.floor(share).astype(np.int64)
    rest = np.argsort(-(share - q), kind="stable")[: total - int(q.sum())]
    q[rest] += 1
    return q


def pack(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices into `lengths` grouped into rows of at most `capacity` tokens."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            room, r = capacity - n, len(rows) - 1
        else:
            room, r = free.pop(at)
            rows[r].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, r))
    return rows


class Plan:
    def __init__(self, lengths: list[np.ndarray], weights: list[float], seed: int, max_length: int,
                 packing: bool, window: int, keep: list[np.ndarray] | None = None):
        self.keep = keep if keep is not None else [np.arange(len(x), dtype=np.int64) for x in lengths]
        self.sizes = [len(k) for k in self.keep]  # drawable dialogues per source
        if not lengths or 0 in self.sizes:  # an epoch of such a source never ends: refuse, never spin
            raise ValueError(f"a source has no dialogue to draw (drawable per source: {self.sizes})")
        self.offsets = np.concatenate([[0], np.cumsum([len(x) for x in lengths])]).astype(np.int64)
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
        self.weights, self.seed = list(weights), seed
        self.max_length, self.packing, self.window = max_length, packing, window
        self.total = sum(self.sizes)
        self.quota = quotas(self.sizes, self.weights)
        self.windows_per_epoch = -(-self.total // window)
        self._order: tuple[int, np.ndarray] | None = None

    def _draws(self, src: int, epoch: int) -> np.ndarray:
        """Source src's draws for an epoch: positions [e*q, (e+1)*q) of its permutation stream."""
        n, q = self.sizes[src], int(self.quota[src])
        start, out = epoch * q, []
        while q > 0:
            cycle, off = divmod(start, n)
            take = min(q, n - off)
            out.append(self.keep[src][_rng(self.seed, _DRAW, src, cycle).permutation(n)[off:off + take]])
            start, q = start + take, q - take
        return np.concatenate(out) + self.offsets[src] if out else np.zeros(0, np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global dialogue indices of an epoch, in training order (before packing)."""
        if self._order is None or self._order[0] != epoch:
            draws = np.concatenate([self._draws(s, epoch) for s in range(len(self.sizes))])
            self._order = (epoch, draws[_rng(self.seed, _ORDER, epoch).permutation(len(draws))])
        return self._order[1]

    def window_rows(self, epoch: int, window: int) -> list[np.ndarray]:
        idx = self.epoch_order(epoch)[window * self.window:(window + 1) * self.window]
        if not self.packing:
            return [idx[i:i + 1] for i in range(len(idx))]
        rows = [idx[r] for r in pack(self.lengths[idx], self.max_length)]
        perm = _rng(self.seed, _ROWS, epoch, window).permutation(len(rows))
        return [rows[i] for i in perm]

    def rows_from(self, cursor: Cursor) -> Iterator[tuple[np.ndarray, Cursor]]:
        """(global dialogue indices of a row, cursor after it), forever."""
        e, w, r, seen = cursor.epoch, cursor.window, cursor.row, cursor.rows_seen
        while True:
            rows = self.window_rows(e, w)
            while r < len(rows):
                r, seen = r + 1, seen + 1
                yield rows[r - 1], Cursor(e, w, r, seen)
            w, r = w + 1, 0
            if w >= self.windows_per_epoch:
                e, w = e + 1, 0
