"""Where a step's time goes: seconds per phase, logged in metrics.jsonl as time_<phase>_s.

Phases of train.train_step: data (waiting for the loader), forward (model and
fused loss), resure (turn losses and weights), collectives (token count,
statistics, step metrics), backward, optimizer (DeepSpeed's step; with ZeRO
it includes the gradient and parameter exchanges it does there), bookkeeping
(metric sums and the audit).

On CPU the clock reads wall time at each phase boundary. On a GPU, kernels
run after the host has moved on, so host time would credit a phase's work to
whichever later phase waits for it: there the clock records a CUDA event at
each boundary (no sync) and reads the intervals between them once per step,
after the step's metric reduction has synchronised anyway.
"""
from __future__ import annotations

import time

import torch


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = []

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self) -> None:
        self._marks = [("", self._now())]

    def mark(self, phase: str) -> None:
        """The time since the previous mark was spent in `phase`."""
        self._marks.append((phase, self._now()))

    def split(self) -> dict[str, float]:
        """{time_<phase>_s: seconds} summed over the step's intervals (phases recur per micro-batch)."""
        out: dict[str, float] = {}
        if self.cuda and len(self._marks) > 1:
            self._marks[-1][1].synchronize()
        for (_, a), (phase, b) in zip(self._marks, self._marks[1:]):
            dt = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            out[f"time_{phase}_s"] = out.get(f"time_{phase}_s", 0.0) + dt
        return out
