"""Fault injection for the reliability tests (tests/test_faults.py).

RESURE_FAULT=WHERE:STEP:RANK kills that rank with SIGKILL at that point. step: in the middle of
optimizer step STEP (after its first forward); save: inside the save of step STEP (DeepSpeed's
files written, not published). Unset, a point costs one dictionary look-up.
"""
from __future__ import annotations

import os
import signal
import sys


def point(where: str, step: int, rank: int) -> None:
    spec = os.environ.get("RESURE_FAULT", "")
    if spec and spec.split(":") == [where, str(step), str(rank)]:
        print(f"[resure_ds] RESURE_FAULT: killing rank {rank} during the {where} of step {step}",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
