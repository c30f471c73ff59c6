"""This node's ranks: start them, pass stop signals on, end the job when one of them fails.

    python -m resure_ds.node --master-port P [--master-addr A] (--nproc N | --hostfile F --node-rank R) CMD ...

launch/train.sh starts it wherever it launches a node itself (one machine; or each node of a
hostfile with NODE_RANK, no ssh). It replaces DeepSpeed's per-node launcher there, whose SIGTERM
handler kills the ranks within 30 s and exits 1: under a scheduler's pre-emption (SLURM sends
SIGTERM to every process of the job) the ranks could not finish their checkpoint, and the job's
status did not say "run again to continue".

- SIGTERM and SIGUSR1 are passed on to every rank still running, each signal once. A rank records
  the request, saves a checkpoint at the next step boundary and exits 75 (runtime/stop.py); this
  launcher waits for it. A rank ended by such a signal that was passed on (it was still starting,
  before its handler was installed: nothing since the last checkpoint is lost) counts as stopped.
- SIGINT and SIGHUP are not passed on: a terminal sends them to the ranks itself (they share this
  launcher's process group). Ranks still running INTERRUPT_WAIT_S later are ended as below; a
  second SIGINT ends them at once.
- A rank that fails (any status but 0 and 75) ends the job: the others are stuck in a collective
  with it, so each rank's process tree gets SIGTERM, then SIGKILL after GRACE_S.
- A rank that exits 75 while others run: they are stopping too (every rank agrees on a stop in the
  step's reduction); those still running STOP_WAIT_S later are ended as above.
- A stop asked for as this launcher started, while its signals were still ignored, is found from
  RESURE_STOP_FILE (made by launch/slurm.sbatch before it signals): on one node it exits 75, no rank
  started. On several, the ranks start (the other nodes' ranks would wait for this node's) and find
  the file themselves: every rank of the job ends together after the rendezvous (resure_ds/train.py).
- If this launcher dies without passing anything on (SIGKILL, the OOM killer), the kernel sends
  each rank SIGTERM (PR_SET_PDEATHSIG): they save and exit 75 as above.

Exit status: the first failing rank's status (128 + N for a rank ended by signal N, ranks taken
in the order they ended); else 75 if a rank stopped with a checkpoint; else 0.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time

EXIT_RESUME = 75  # runtime/stop.py's status (not imported: this process imports no torch)
GRACE_S = 10.0
STOP_WAIT_S = 120.0
INTERRUPT_WAIT_S = 10.0
POLL_S = 0.2  # how often deadlines are checked, and ranks polled where no pidfd tells of their end (Linux < 5.3)
PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
INTERRUPTS = (signal.SIGINT, signal.SIGHUP)
HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)(\s|$)")  # DeepSpeed's hostfile; more after slots= is ignored


class LaunchError(Exception):
    pass


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """[(host, slots)] in file order: `host slots=N` lines; blank lines and # comments skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise LaunchError(f"HOSTFILE {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise LaunchError(f"HOSTFILE {path}: {e.strerror or e}") from e
    hosts: list[tuple[str, int]] = []
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        m = HOST_LINE.match(text)
        if not m or int(m.group(2)) < 1:
            raise LaunchError(f"HOSTFILE {path} line {n}: {line.strip()!r}: write `HOSTNAME slots=N` with N >= 1")
        if m.group(1) in (h for h, _ in hosts):
            raise LaunchError(f"HOSTFILE {path} line {n}: host {m.group(1)} is listed twice")
        hosts.append((m.group(1), int(m.group(2))))
    if not hosts:
        raise LaunchError(f"HOSTFILE {path} lists no host: write one `HOSTNAME slots=N` line per node")
    return hosts


def rank_envs(hosts: list[tuple[str, int]], node_rank: int, addr: str, port: int) -> list[dict[str, str]]:
    """The environment of each rank of node `node_rank`: global ranks in hostfile order."""
    if not 0 <= node_rank < len(hosts):
        raise LaunchError(f"NODE_RANK={node_rank}: the hostfile lists {len(hosts)} node(s): give 0 to {len(hosts) - 1}")
    first = sum(slots for _, slots in hosts[:node_rank])
    local = hosts[node_rank][1]
    world = sum(slots for _, slots in hosts)
    common = {"MASTER_ADDR": addr, "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
              "LOCAL_SIZE": str(local), "LOCAL_WORLD_SIZE": str(local),
              "CROSS_RANK": str(node_rank), "CROSS_SIZE": str(len(hosts))}
    return [{**common, "RANK": str(first + i), "LOCAL_RANK": str(i)} for i in range(local)]


def _rank_setup(parent: int):
    def setup() -> None:  # in the child, between fork and exec: no handler of ours may run here
        for sig in (*STOP_SIGNALS, *INTERRUPTS):
            signal.signal(sig, signal.SIG_DFL)
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: nothing tells the ranks if this launcher dies
            return
        if os.getppid() != parent:  # it died before prctl took effect
            os._exit(128 + signal.SIGTERM)
    return setup


def status_of(code: int) -> int:
    return 128 - code if code < 0 else code


def tree(pid: int) -> list[int]:
    """pid and its descendants (a rank's data workers, say), parents first."""
    try:
        import psutil  # DeepSpeed's dependency; only needed to end ranks

        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except Exception:  # psutil missing, or the process gone
        return [pid]


class Node:
    def __init__(self):
        self.alive: dict[int, subprocess.Popen] = {}  # started and not yet reaped (a zombie can be signalled)
        self.ended: list[int] = []  # statuses, in the order the ranks ended
        self.passed: list[int] = []  # stop signals passed on: each once, a rank started later gets them too
        self.requested: set[int] = set()  # statuses of a rank ended by a stop signal passed on
        self.interrupts = 0
        self.deadline: float | None = None  # when the ranks still running are ended
        self.ending = 0  # 0, 1 (SIGTERM sent to every rank's tree), 2 (SIGKILL sent)

    def start(self, cmd: list[str], envs: list[dict[str, str]]) -> None:
        for e in envs:
            try:
                proc = subprocess.Popen(cmd, env={**os.environ, **e}, preexec_fn=_rank_setup(os.getpid()))
            except OSError as err:
                raise LaunchError(f"rank {e['RANK']} could not start {cmd[0]}: {err.strerror or err}") from err
            self.alive[proc.pid] = proc
            for signum in self.passed:
                self._kill([proc.pid], signum)

    def on_signal(self, signum, frame) -> None:
        if signum in STOP_SIGNALS:
            if signum not in self.passed:
                self.passed.append(signum)
                self.requested.add(128 + signum)
                self._kill(list(self.alive), signum)
            return
        self.interrupts += 1
        if signum == signal.SIGINT and self.interrupts > 1:
            self.end_ranks(at_once=True)
        else:
            self._due(INTERRUPT_WAIT_S)

    def _due(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        if not self.ending:
            self.deadline = until if self.deadline is None else min(self.deadline, until)

    @staticmethod
    def _kill(pids: list[int], signum) -> None:
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def end_ranks(self, at_once: bool = False) -> None:
        """SIGTERM to every running rank's process tree, then (GRACE_S later, or now) SIGKILL."""
        if self.ending == 2:
            return
        pids = [p for pid in self.alive for p in tree(pid)]
        if at_once or self.ending == 1:
            self.ending = 2
            self._kill(pids, signal.SIGKILL)
        else:
            self.ending, self.deadline = 1, time.monotonic() + GRACE_S
            self._kill(pids, signal.SIGTERM)

    def _reaped(self, proc: subprocess.Popen) -> None:
        del self.alive[proc.pid]  # before reaping: a handler must not signal a reaped pid
        code = status_of(proc.wait())
        code = EXIT_RESUME if code in self.requested and not self.ending else code
        self.ended.append(code)
        if code == EXIT_RESUME:
            self._due(STOP_WAIT_S)
        elif code:
            self._due(0.0)

    def wait(self) -> int:
        fds = _pidfds(list(self.alive.values()))
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        try:
            while self.alive:
                # a deadline set by a signal handler is seen within POLL_S (poll resumes after a handler)
                timeout = POLL_S if self.deadline is None else min(POLL_S, max(0.0, self.deadline - time.monotonic()))
                if fds:
                    ready = [fd for fd, _ in poller.poll(timeout * 1000)]
                    for fd in ready:
                        poller.unregister(fd)
                    done = [fds[fd] for fd in ready]
                else:
                    time.sleep(timeout)
                    done = [p for p in list(self.alive.values()) if p.poll() is not None]
                for p in done:
                    self._reaped(p)
                if self.alive and self.deadline is not None and time.monotonic() >= self.deadline:
                    self.end_ranks()
        finally:
            for fd in fds:
                os.close(fd)
        failed = [c for c in self.ended if c not in (0, EXIT_RESUME)]
        return failed[0] if failed else (EXIT_RESUME if EXIT_RESUME in self.ended else 0)


def _pidfds(procs: list[subprocess.Popen]) -> dict[int, subprocess.Popen]:
    """A file descriptor per rank that becomes readable when it ends (so the first failure is
    known as the first); {} where the kernel has none (then ranks are polled)."""
    fds: dict[int, subprocess.Popen] = {}
    try:
        for p in procs:
            fds[os.pidfd_open(p.pid)] = p
    except (AttributeError, OSError):
        for fd in fds:
            os.close(fd)
        return {}
    return fds


def stop_asked_before() -> bool:
    """launch/slurm.sbatch makes RESURE_STOP_FILE before it signals a stop: one that came while this
    process started, with the signals still ignored (launch/train.sh's hand-over), is seen here.
    Read after the handlers are in place, so a stop is either caught or found here."""
    path = os.environ.get("RESURE_STOP_FILE")
    return bool(path) and os.path.exists(path)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m resure_ds.node", description=__doc__.split("\n\n")[0])
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--nproc", type=int, help="ranks on this machine (one node)")
    p.add_argument("--hostfile", help="several nodes: `HOST slots=N` lines")
    p.add_argument("--node-rank", type=int, help="with --hostfile: this node's line, from 0")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="what each rank runs")
    args = p.parse_args(argv)
    if args.cmd[:1] == ["--"]:
        args.cmd = args.cmd[1:]
    if (args.nproc is None) == (args.hostfile is None):
        p.error("give --nproc or --hostfile")
    if args.nproc is not None and args.nproc < 1:
        p.error(f"--nproc {args.nproc}: give 1 or more ranks")
    if (args.node_rank is None) != (args.hostfile is None):
        p.error("--node-rank goes with --hostfile")
    if not args.cmd:
        p.error("give the command each rank runs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    node = Node()
    for sig in (*STOP_SIGNALS, *INTERRUPTS):
        signal.signal(sig, node.on_signal)
    if stop_asked_before() and args.hostfile is None:  # one node: no rank started anywhere
        print("[resure_ds] a stop was asked for as the launcher started: no rank started; run again to continue",
              file=sys.stderr)
        return EXIT_RESUME
    try:
        hosts = read_hostfile(args.hostfile) if args.hostfile else [("localhost", args.nproc)]
        envs = rank_envs(hosts, args.node_rank or 0, args.master_addr, args.master_port)
        print(f"[resure_ds] node {args.node_rank or 0} of {len(hosts)} node(s): ranks "
              f"{envs[0]['RANK']} to {envs[-1]['RANK']} of {envs[0]['WORLD_SIZE']}, each running {shlex.join(args.cmd)}",
              file=sys.stderr, flush=True)
        node.start(args.cmd, envs)
    except LaunchError as e:
        print(f"[resure_ds] error: {e}", file=sys.stderr)
        if node.alive:  # the ranks started before the failure
            node.end_ranks()
            node.wait()
        return 2
    return node.wait()


if __name__ == "__main__":
    sys.exit(main())
