"""One run per run folder: a lock held for the whole run.

Two launches into one folder would both train, append to one metrics.jsonl, cut each other's audit
on resume and publish checkpoints over each other. So rank 0 of a job takes an exclusive POSIX lock
(fcntl) on <run>/.lock before anything is written there, and holds it until the process ends; the
file names the holder (host, pid, start, command). A second launch finds the lock taken and every
one of its ranks stops before writing, with one line naming the holder. The kernel releases the lock
when its process dies, however it dies, so the lock of a killed run is simply taken over (the start-up
line says whose it was). Across nodes, the lock is what the file system makes of POSIX locks: local
disks and NFSv4 (with its lock service) honour them across hosts; a file system that ignores them
(some FUSE mounts; Lustre without -o flock) gives each node its own lock, and there two launches on
two hosts into one folder are not refused.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

LOCK = ".lock"


class RunFolderBusy(Exception):
    """The run folder is held by another live run."""


class RunLock:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self.fd: int | None = None
        self.previous: dict | None = None  # the holder of a lock left by a run that died

    def acquire(self) -> None:
        """Take the lock, or raise RunFolderBusy naming its holder."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(fd)
            os.close(fd)
            raise RunFolderBusy(f"{os.path.dirname(self.path)} is in use by another run ({describe(holder)}); wait "
                                "for it to end, or give this one another output.name") from None
        self.previous = _read(fd) or None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        """A run that ends by itself leaves the file empty (so the next start reports no takeover)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}: "
            f"{holder.get('command', '')[:160]}")
