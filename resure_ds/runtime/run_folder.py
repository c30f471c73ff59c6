"""The run folder: never inside the training data, and one run at a time in it (a lock held for the
whole run).

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

import errno
import fcntl
import json
import os
import socket
import sys
import time

from .. import dist
from ..config import Config
from ..config.parse import SourceSpec, train_specs
from ..files import check_target, input_root

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
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):  # a file system without POSIX locks (ENOLCK, ...)
                print(f"[resure_ds] warning: {self.path} cannot be locked ({e.strerror}): this file system does "
                      "not take POSIX locks, so nothing stops a second launch into this run folder",
                      file=sys.stderr, flush=True)
                self.fd = fd
                return
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


def check_place(cfg: Config, run_dir: str) -> None:
    """The run folder is never an input of the run, inside one or around one (files.check_target): a
    run inside its data folder would be read back as data by the next prepare."""
    specs = train_specs(cfg.data) + ([SourceSpec(cfg.data.eval)] if isinstance(cfg.data.eval, str) else [])
    guard = {input_root(s.path): f"an input of this run (source {s.label or s.path})" for s in specs
             if s.path != "chitchat" and os.path.exists(input_root(s.path))}
    check_target(run_dir, guard, "the run folder (output.dir/output.name)", "give an output.dir outside the training data")


def claim(cfg: Config, run_dir: str, rank: int) -> RunLock | None:
    """Before anything is written in the run folder: its place checked, and its lock taken by rank 0;
    every rank learns whether rank 0 got it (one all-reduce), so a second launch stops on all its
    ranks. Returns rank 0's lock (None elsewhere)."""
    check_place(cfg, run_dir)
    lock, busy = (RunLock(run_dir) if rank == 0 else None), ""
    if lock is not None:
        try:
            lock.acquire()
        except RunFolderBusy as e:
            busy = str(e)
    if dist.all_reduce_dict({"busy": float(bool(busy))})["busy"]:
        raise RunFolderBusy(busy)
    if lock is not None and lock.previous:
        dist.print0(f"took over the lock of {run_dir}, left by a run that ended without releasing it "
                    f"({describe(lock.previous)})")
    return lock
