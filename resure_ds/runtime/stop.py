"""When an invocation stops before max_steps: train.stop_after, train.time_limit, or a signal.

SLURM (and most schedulers) warn a job before its end with SIGTERM or, with
`--signal=USR1@SECONDS`, SIGUSR1. A handler only records the request; the
loop acts at the next optimizer-step boundary, where every rank agrees
(the request travels in the step's metric reduction, so one signalled rank
is enough), saves a checkpoint and exits with EXIT_RESUME. The same
command, run again, continues from that checkpoint; launch/slurm.sbatch
requeues itself on that status.
"""
from __future__ import annotations

import math
import os
import signal
import time

from ..errors import TrainingError

EXIT_RESUME = 75  # EX_TEMPFAIL: stopped early on purpose, a checkpoint is saved; run again to continue
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


_EARLY: list[str] = []  # stop signals that came before StopPolicy.install: while the rank imported


def record_early() -> None:
    """A rank's first act (resure_ds/train.py run as a program): a SIGTERM/SIGUSR1 while its imports
    run (seconds) is recorded for StopPolicy.install, not the signal's default action. A rank that
    died of it counted as stopped on its node, but the ranks of the other nodes then waited for it
    at the rendezvous until dist.timeout, and the job failed."""
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, frame: _EARLY.append(signal.Signals(signum).name))


def stop_file_made() -> bool:
    """launch/slurm.sbatch makes RESURE_STOP_FILE before it signals a stop (docs/operating.md)."""
    path = os.environ.get("RESURE_STOP_FILE")
    return bool(path) and os.path.exists(path)


class StoppedAtStart(Exception):
    """A stop asked for before the first step, agreed by every rank: nothing to save."""

    def __init__(self):
        super().__init__(f"a stop was asked for as the ranks started: no step run, nothing saved; exit status "
                         f"{EXIT_RESUME}: run the same command to continue")


class StopPolicy:
    def __init__(self, stop_after: int, time_limit_s: float, started: float | None = None):
        self.stop_after, self.time_limit_s = stop_after, time_limit_s
        self.started = time.monotonic() if started is None else started
        self.signalled: str | None = None
        self.slowest_step = 0.0
        self.slowest_save = 0.0

    def install(self) -> None:
        """Record SIGTERM/SIGUSR1 instead of dying (main thread only), and any that came before."""
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        if _EARLY and self.signalled is None:  # after the handlers: none is missed in between
            self.signalled = _EARLY[0]

    def asked_at_start(self) -> bool:
        return self.signalled is not None or stop_file_made()

    def end_if_asked_at_start(self, reduce_max) -> None:
        """Right after the rendezvous: a stop asked for while the ranks started (a signal, or
        slurm.sbatch's RESURE_STOP_FILE) ends every rank together (StoppedAtStart), before anything
        is loaded or written; on several nodes a rank that left alone would leave the others waiting
        in a collective. reduce_max: dist.all_reduce_dict (passed in: this module imports no torch)."""
        if reduce_max({"stop": float(self.asked_at_start())}, op="max")["stop"]:
            raise StoppedAtStart()

    def _on_signal(self, signum, frame) -> None:
        self.signalled = signal.Signals(signum).name

    def end_step(self, start_step: int, max_steps: int) -> int:
        """The last step this invocation may run by train.stop_after."""
        return min(max_steps, start_step + self.stop_after) if self.stop_after else max_steps

    def out_of_time(self) -> bool:
        """Would one more step and a save overrun train.time_limit? (this rank's clocks; the loop
        reduces the answer over ranks). Margin: twice the slowest step plus the slowest save so far
        (a minute when none was timed yet)."""
        if not self.time_limit_s:
            return False
        margin = 2 * self.slowest_step + (self.slowest_save or 60.0)
        return time.monotonic() - self.started + margin >= self.time_limit_s

    def local_request(self) -> dict[str, float]:
        return {"stop_signal": float(self.signalled is not None), "stop_time": float(self.out_of_time())}


class Divergence:
    """A run that stops learning stops itself: after `limit` consecutive optimizer steps whose loss or
    gradient norm is not finite, that trained no turn with a finite loss (no token at all included), or
    that DeepSpeed skipped
    (train.max_bad_steps; 0 = never). Every rank sees the same metrics row (all-reduced), so every
    rank stops at the same step. While a streak lasts no checkpoint is saved (`healthy`)."""

    def __init__(self, limit: int, lr: float):
        self.limit, self.lr = limit, lr
        self.since: int | None = None  # first step of the current streak
        self.tokenless = False  # every step of the streak trained no token

    @property
    def healthy(self) -> bool:
        return self.since is None

    def check(self, step: int, row: dict) -> None:
        bad = (not math.isfinite(row["loss"]) or row["skipped_step"] or row["turns"] == 0
               or (row["grad_norm"] is not None and not math.isfinite(row["grad_norm"])))
        self.since = (self.since or step) if bad else None
        self.tokenless = (self.tokenless if bad and self.since < step else True) and row["trained_tokens"] == 0
        if self.limit and bad and step - self.since + 1 >= self.limit and self.tokenless:
            raise TrainingError(
                f"{self.limit} consecutive optimizer steps ({self.since}-{step}) trained no token: the rows hold "
                "nothing to learn (is data.max_length shorter than the chat template's text around a reply? are "
                "the replies train: false or weight 0?). Nothing was exported; raise data.max_length or fix the "
                "data (train.max_bad_steps sets the limit)")
        if self.limit and bad and step - self.since + 1 >= self.limit:
            raise TrainingError(
                f"the run diverged: {self.limit} consecutive optimizer steps ({self.since}-{step}) had a "
                f"non-finite loss or gradient norm, no turn with a finite loss, or were skipped by DeepSpeed "
                f"(last: loss {row['loss']}, grad norm {row['grad_norm']}, {row['nonfinite_turns']} non-finite "
                f"turns). Nothing was exported and no checkpoint of these steps was saved. Lower train.lr "
                f"(now {self.lr}), keep train.grad_clip on, check the data for extreme records, and start "
                "afresh or resume from the last checkpoint (train.max_bad_steps sets the limit)")
