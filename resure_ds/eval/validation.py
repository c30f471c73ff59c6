"""Validation during training: the clean per-turn loss on held-out dialogues.

Every rank (every sequence-parallel group, its rows cut along the sequence)
evaluates its share of the validation rows (one dialogue per padded row, like
`python -m resure_ds.eval`), and the per-depth sums
(eval/depth.py) are all-reduced, so every rank ends with the same numbers.
Under ZeRO-3 a forward is a collective, so every rank runs the same number of
forwards: a rank with no rows left in the last round repeats a row and drops
the result. Turns cut by max_length count, as in resure_ds.eval; no weights apply.
"""
from __future__ import annotations

import torch

from ..data.collate import collate
from .. import dist
from ..runtime.sequence import SequenceParallel
from ..stats.turns import shift_targets, turn_losses
from .depth import DepthSums, summarize


class Validation:
    def __init__(self, rows: list, pad_id: int, micro_batch: int, sp: SequenceParallel | None = None):
        if not rows:
            raise ValueError("the validation split is empty")
        self.rows, self.pad_id, self.micro_batch = rows, pad_id, micro_batch
        self.sp = sp if sp is not None else SequenceParallel(1, 0, 1)  # a group shares its rows, cut along them
        self.depth = max(max(len(r.partial) for r in rows), 1)  # the same on every rank
        self.dialogues = len({r.dialogue_id for r in rows})  # a long dialogue may be several rows (data.overflow)

    @torch.no_grad()
    def run(self, engine) -> dict:
        """engine: the runtime Engine (its device is where the forwards and the all-reduce run)."""
        sp, mb, dev = self.sp, self.micro_batch, engine.device
        rank, per = sp.dp_rank, sp.dp_world * mb
        sums = DepthSums(self.depth)
        engine.train(False)
        try:
            for start in range(0, len(self.rows), per):
                mine = self.rows[start + rank * mb:start + (rank + 1) * mb]
                batch = collate([[r] for r in (mine or self.rows[:1])], self.pad_id, packed=False)
                tg = shift_targets(batch["labels"].to(dev), batch["turn_ids"].to(dev), batch["doc_ids"].to(dev))
                if sp.on:
                    local, tg_mine = sp.shard(batch, tg)
                    nll = sp.gather(engine.token_nll(local, tg_mine.labels), tg.labels.shape[1])
                else:
                    nll = engine.token_nll(batch, tg.labels)
                t = turn_losses(nll, tg, len(batch["dialogue_ids"]), batch["partial"].shape[1])
                if mine and sp.leader:
                    sums.add(t)
        finally:
            engine.train(True)
        flat = torch.from_numpy(sums.table.flatten())
        total = dist.all_reduce_sum(flat, dev).view(self.depth, 4).numpy()
        return summarize(total, self.dialogues)
