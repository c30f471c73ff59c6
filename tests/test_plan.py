"""The training order: world-size free, resumable in O(1) from a cursor, mixtures in proportion,
dense packing that keeps every dialogue once per epoch."""
import itertools
import math

import numpy as np
import pytest

from resure_ds.data.plan import Cursor, Plan, pack, quotas


def lengths(n, seed=0, hi=300):
    return np.random.default_rng(seed).integers(5, hi, n).astype(np.int32)


def take(it, n):
    return list(itertools.islice(it, n))


@pytest.mark.parametrize("packing", [True, False])
def test_epoch_holds_every_dialogue_once_and_rows_fit(packing):
    p = Plan([lengths(1000)], [1.0], 7, 512, packing, window=128)
    rows = [r for w in range(p.windows_per_epoch) for r in p.window_rows(0, w)]
    flat = np.concatenate(rows)
    assert sorted(flat.tolist()) == list(range(1000))
    assert all(p.lengths[r].sum() <= 512 for r in rows)
    assert not np.array_equal(flat, np.arange(1000))  # shuffled
    other = np.concatenate([r for w in range(p.windows_per_epoch) for r in p.window_rows(1, w)])
    assert not np.array_equal(flat, other)  # a new order each epoch


def test_packing_is_dense():
    for cap in (512, 1024, 2048):
        rows = pack(lengths(4096, hi=400), cap)
        fill = lengths(4096, hi=400).sum() / (len(rows) * cap)
        assert fill > 0.97, (cap, fill)


def test_resume_from_any_cursor_continues_the_same_stream():
    p = Plan([lengths(500, 1), lengths(300, 2)], [2.0, 1.0], 3, 256, True, window=64)
    straight = take(p.rows_from(Cursor()), 900)  # more than an epoch
    for k in (0, 1, 37, 401, 899):
        at = straight[k - 1][1] if k else Cursor()
        fresh = Plan([lengths(500, 1), lengths(300, 2)], [2.0, 1.0], 3, 256, True, window=64)
        tail = take(fresh.rows_from(at), 900 - k)
        assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(straight[k:], tail)), k
    assert straight[-1][1].epoch >= 1 and straight[-1][1].rows_seen == 900


def test_mixture_draws_in_proportion():
    sizes, weights = [2000, 500], [1.0, 3.0]
    q = quotas(sizes, weights)
    assert q.sum() == 2500 and q.tolist() == [625, 1875]
    p = Plan([lengths(2000, 3), lengths(500, 4)], weights, 11, 256, False, window=1000)
    order = p.epoch_order(0)
    src = p.source_of(order)
    assert (src == 1).sum() == 1875  # upsampled: each of its 500 dialogues 3 or 4 times
    counts = np.bincount(order[src == 1] - 2000, minlength=500)
    assert counts.min() == 3 and counts.max() == 4
    # any prefix of the stream: the share of source 1 within binomial sampling error
    for n in (200, 800):
        share = (p.source_of(np.concatenate([r for r, _ in take(p.rows_from(Cursor()), n)])) == 1).mean()
        assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n), (n, share)
    # the downsampled source (625 draws an epoch) is seen whole before any dialogue repeats
    def seen(epochs):
        s = np.concatenate([p.epoch_order(e) for e in range(epochs)])
        return np.bincount(s[p.source_of(s) == 0], minlength=2000)

    assert seen(3).max() == 1 and seen(4).min() == 1


def test_order_does_not_depend_on_world_size():
    """Micro-step m takes the next world*micro_batch rows; rank k its k-th share. World 2 x 2 and
    world 1 x 4 cover the same rows in the same order (what a resume on another world relies on)."""
    from resure_ds.data.loader import RankBatches, Stream

    class Fake(RankBatches):  # the plan only, no shards: which global rows each rank takes
        def __iter__(self):
            p = Plan([lengths(300, 5)], [1.0], self.stream.seed, 256, True, 32)
            rows = p.rows_from(self.cursor)
            mb = self.stream.micro_batch
            while True:
                step = take(rows, self.world * mb)
                yield [r.tolist() for r, _ in step[self.rank * mb:(self.rank + 1) * mb]]

    def stream(world, mb, n):
        its = [iter(Fake(Stream([], [1.0], 9, 256, True, 32, mb, 0), k, world, Cursor())) for k in range(world)]
        return [row for _ in range(n) for it in its for row in next(it)]

    assert stream(2, 2, 10) == stream(1, 4, 10) == stream(4, 1, 10)


def test_a_source_with_nothing_to_draw_is_refused_not_spun_on():
    """A held-out split that takes a whole source (or every source) would leave an epoch that never
    ends (a division by zero, or a loop at 100% CPU): the plan refuses it."""
    keep = [np.arange(5, dtype=np.int64), np.zeros(0, np.int64)]
    with pytest.raises(ValueError, match=r"no dialogue to draw \(drawable per source: \[5, 0\]\)"):
        Plan([lengths(5, 1), lengths(3, 2)], [1.0, 1.0], 0, 256, True, 8, keep=keep)
    with pytest.raises(ValueError, match="no dialogue to draw"):
        Plan([lengths(3, 2)], [1.0], 0, 256, True, 8, keep=[np.zeros(0, np.int64)])
