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

import signal
import time

EXIT_RESUME = 75  # EX_TEMPFAIL: stopped early on purpose, a checkpoint is saved; run again to continue
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopPolicy:
    def __init__(self, stop_after: int, time_limit_s: float, started: float | None = None):
        self.stop_after, self.time_limit_s = stop_after, time_limit_s
        self.started = time.monotonic() if started is None else started
        self.signalled: str | None = None
        self.slowest_step = 0.0
        self.slowest_save = 0.0

    def install(self) -> None:
        """Record SIGTERM/SIGUSR1 instead of dying (main thread only)."""
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

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
