"""Rank-0 step metrics: metrics.jsonl, the trackers of output.report_to (trackers.py), progress
bar. (The per-turn audit is audit.py.)"""
from __future__ import annotations

import json
import os

from ..files import jsonl_rows
from .trackers import scalars


class MetricsLogger:
    """Rank 0 only: every step to metrics.jsonl (appended; truncated to the
    resumed step on resume), every log_every steps to the trackers (output.report_to)."""

    def __init__(self, run_dir: str, total_steps: int, start_step: int, log_every: int, trackers: list):
        from tqdm import tqdm

        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._truncate(start_step)
        self.f = open(self.path, "a", encoding="utf-8")
        self.log_every = log_every
        self.trackers = trackers
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _truncate(self, start_step: int) -> None:
        if not os.path.exists(self.path):
            return
        keep = [row for row in jsonl_rows(self.path) if row.get("step", 0) <= start_step]  # a cut-off last line: left out
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in keep)

    def log(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        step = row["step"]
        if self.trackers and step % self.log_every == 0:
            values = scalars(row)
            for t in self.trackers:
                t.log(values, step)
        self.bar.update(1)
        if step % self.log_every == 0:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", w=f"{row['mean_weight']:.3f}",
                                 tok_s=f"{row['tokens_per_s']:.0f}")

    def close(self) -> None:
        self.bar.close()
        self.f.close()
        for t in self.trackers:
            t.close()
