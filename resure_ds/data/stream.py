"""Per-rank example stream: sources -> seeded shuffle -> shard -> render.

Every rank reads and validates every record (cheap next to training), so
data errors and skip counts are the same on all ranks, and tokenizes only
its share (global record index % world_size == rank). The shuffle is a
seeded buffer, so memory stays bounded for corpora larger than memory.
The position (epoch, records consumed in this epoch) rides in the
checkpoint; resuming replays the reader without tokenizing to get there.
"""
from __future__ import annotations

import random
from typing import Any, Iterator

from .records import DataError, Dialogue, SkipCounter, read_dialogues
from .render import Example, Renderer


def shuffled(items: Iterator[Dialogue], buffer: int, seed: int) -> Iterator[Dialogue]:
    rng = random.Random(seed)
    buf: list[Dialogue] = []
    for it in items:
        buf.append(it)
        if len(buf) >= buffer:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ExampleStream:
    def __init__(self, source: Any, renderer: Renderer, rank: int, world_size: int, seed: int,
                 shuffle_buffer: int, skip_invalid: bool):
        self.source, self.renderer = source, renderer
        self.rank, self.world = rank, world_size
        self.seed, self.buffer, self.skip_invalid = seed, shuffle_buffer, skip_invalid
        self.epoch, self.pos = 0, 0  # pos = records consumed from this epoch's shuffled order
        self._live, self._complete = SkipCounter(), None  # invalid records (all ranks see all)
        self.truncated_away = 0        # this rank's examples with no trained token left

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.pos = sd["epoch"], sd["pos"]

    @property
    def skip_counts(self) -> SkipCounter:
        """Invalid records per kind in the last complete pass (or the pass so far)."""
        return self._complete if self._complete is not None else self._live

    def __iter__(self) -> Iterator[Example]:
        while True:
            start, produced = self.pos, False
            self._live = SkipCounter()
            records = shuffled(read_dialogues(self.source, self.skip_invalid, self._live),
                               self.buffer, self.seed * 1000003 + self.epoch)
            for i, d in enumerate(records):
                if i < self.pos:
                    continue  # replaying to the resumed position: no tokenization
                self.pos = i + 1
                if i % self.world != self.rank:
                    continue
                ex = self.renderer.render(d)
                if ex is None:
                    self.truncated_away += 1
                    continue
                produced = True
                yield ex
            self._complete = self._live
            if start == 0 and not produced:
                raise DataError(f"{self.source}: a full pass gave rank {self.rank} no trainable dialogue "
                                f"(invalid skipped: {self._live.summary()}; left with no trained token "
                                f"by data.max_length: {self.truncated_away}). Add data or raise data.max_length")
            self.epoch, self.pos = self.epoch + 1, 0


def batches(stream: ExampleStream, size: int) -> Iterator[list[Example]]:
    it = iter(stream)
    while True:
        yield [next(it) for _ in range(size)]
