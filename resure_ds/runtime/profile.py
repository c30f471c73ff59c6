"""train.profile_steps: a few steps under torch.profiler on rank 0, to see where a step's time goes.

Writes to the run folder, once the last profiled step ends:
  profile.txt   the operators and kernels with the most self time (device time first on a GPU,
                else host time), and on a GPU how busy the device was over the profiled steps
                (the rest is host gaps: Python, hooks, launches, waits)
  profile.json  the Chrome trace (chrome://tracing, or https://ui.perfetto.dev)
The profiled steps run slower than the others (the profiler records every operator); their
metrics.jsonl rows say so in their step time.
"""
from __future__ import annotations

import os
import time

import torch

from ..config import parse_steps


class StepProfiler:
    def __init__(self, spec: int | str | None, run_dir: str, rank: int):
        self.span = parse_steps(str(spec)) if spec and rank == 0 else None
        self.run_dir, self.prof, self.t0, self.first = run_dir, None, 0.0, 0

    def before(self, step: int) -> None:
        """Called before step `step` (1-based) runs: profiling starts at the first step of the span
        this run reaches (a run resumed inside the span profiles the rest of it)."""
        if self.span is None or self.prof is not None or not self.span[0] <= step <= self.span[1]:
            return
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self.prof = torch.profiler.profile(activities=acts)
        self.prof.start()
        self.t0, self.first = time.perf_counter(), step

    def after(self, step: int) -> None:
        """Called after step `step` ran: the last profiled step writes the files."""
        if self.prof is not None and step >= self.span[1]:
            self.finish(step)

    def finish(self, step: int) -> None:
        """Write the files now (the last step, or a run that stopped inside the profiled steps)."""
        if self.prof is None:
            return
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.stop()
        events = self.prof.key_averages()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        first = self.first
        lines = [f"steps {first}-{step}: {wall:.3f} s of wall time, {wall / (step - first + 1):.3f} s a step"]
        if cuda:
            busy = sum(e.self_device_time_total for e in events) / 1e6
            lines.append(f"device busy {busy:.3f} s ({busy / wall:.0%} of the wall time; the rest: host gaps)")
        lines.append(events.table(sort_by=key, row_limit=30, max_name_column_width=60))
        with open(os.path.join(self.run_dir, "profile.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        self.prof.export_chrome_trace(os.path.join(self.run_dir, "profile.json"))
        self.prof = None
