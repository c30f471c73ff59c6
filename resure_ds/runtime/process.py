"""How a rank's process leaves: at once after a failure, quickly after a run that ended by itself."""
from __future__ import annotations

import atexit
import os
import sys
import threading


def leave_now(code: int) -> int:
    """Leave at once, on every world size: the other ranks may be waiting in a collective that will
    never complete, and this process may hold loader workers or threads that would keep it alive
    (one rank once waited forever on a failed worker), so no goodbye collective
    (destroy_process_group) and no waiting. The launcher sees the status and ends the other ranks;
    without one, they hit dist.timeout. Everything of ours on disk is published by rename, so
    nothing is torn by leaving here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def leave(code: int) -> None:
    """Leave after a run that ended by itself, without Python's own teardown of torch, DeepSpeed and
    their modules (seconds per rank, paid at every start of every test and job: docs/performance.md).
    Everything of ours is closed by now; what Python would still do that matters is done here: the
    threads that are not daemons are joined and the exit handlers run (the trackers', the loader
    workers' and the logging module's), then the output is flushed."""
    main_thread = threading.main_thread()
    for t in threading.enumerate():
        if t is not main_thread and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
