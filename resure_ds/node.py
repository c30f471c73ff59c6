"""This node's ranks: start them, pass stop signals on, end the job when one of them fails.

    python -m resure_ds.node --master-addr A --master-port P (--nproc N | --hostfile F --node-rank R) CMD ...

launch/train.sh starts it wherever it launches a node itself (one machine; or each node of a
hostfile with NODE_RANK, no ssh). It replaces DeepSpeed's per-node launcher there, whose SIGTERM
handler kills the ranks within 30 s and exits 1: under a scheduler's pre-emption (SLURM sends
SIGTERM to every process of the job) the ranks could not finish their checkpoint, and the job's
status did not say "run again to continue".

- SIGTERM and SIGUSR1 are passed to every rank still running. A rank records the request, saves a
  checkpoint at the next step boundary and exits 75 (runtime/stop.py); this launcher waits for it.
- SIGINT (Ctrl-C) is passed on as SIGINT; a second one kills the ranks. Each rank runs in a process
  group of its own, so a terminal's Ctrl-C reaches the ranks once, through this launcher.
- A rank ended by a stop signal that was passed on (it was still starting, before its handler was
  installed: nothing since the last checkpoint is lost) counts as stopped: 75.
- A rank that fails (any status but 0 and 75) ends the job: the others are stuck in a collective
  with it, so they get SIGTERM, then SIGKILL after GRACE_S.
- A rank that exits 75 while others run: they are stopping too (every rank agrees on a stop in the
  step's reduction); after STOP_WAIT_S they are ended as above.
- If this launcher dies without passing anything on (SIGKILL, the OOM killer), the kernel sends
  each rank SIGTERM (PR_SET_PDEATHSIG): they save and exit 75 as above.

Exit status: the first failing rank's status (128 + N for a rank ended by signal N); else 75 if a
rank stopped with a checkpoint; else 0.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import subprocess
import sys
import time

EXIT_RESUME = 75  # runtime/stop.py's status (not imported: this process imports no torch)
GRACE_S = 10.0
STOP_WAIT_S = 120.0
POLL_S = 0.2
PR_SET_PDEATHSIG = 1
HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


class LaunchError(Exception):
    pass


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """[(host, slots)] in file order: `host slots=N` lines; blank lines and # comments skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
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
    def setup() -> None:  # in the child, between fork and exec
        os.setpgid(0, 0)
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: nothing tells the ranks if this launcher dies
            return
        if os.getppid() != parent:  # it died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return setup


def status_of(code: int) -> int:
    return 128 - code if code < 0 else code


class Node:
    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.ended: list[int] = []  # statuses, in the order the ranks ended
        self.interrupts = 0
        self.sent: list[int] = []  # signals passed on so far: a rank started later gets them too
        self.requested: set[int] = set()  # statuses of a rank ended by a stop signal passed on
        self.deadline: float | None = None  # when the ranks still running are ended
        self.terminated = False

    def start(self, cmd: list[str], envs: list[dict[str, str]]) -> None:
        for e in envs:
            proc = subprocess.Popen(cmd, env={**os.environ, **e}, preexec_fn=_rank_setup(os.getpid()))
            self.procs.append(proc)
            for signum in self.sent:
                proc.send_signal(signum)

    def on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                self._send(signal.SIGKILL)
                return
        else:
            self.requested.add(128 + signum)
        self._send(signum)

    def _send(self, signum) -> None:
        self.sent.append(signum)
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    def wait(self) -> int:
        running = list(self.procs)
        while running:
            for p in list(running):
                if p.poll() is None:
                    continue
                running.remove(p)
                code = status_of(p.returncode)
                code = EXIT_RESUME if code in self.requested else code
                self.ended.append(code)
                if code != 0 and not self.terminated:
                    until = time.monotonic() + (STOP_WAIT_S if code == EXIT_RESUME else 0.0)
                    self.deadline = until if self.deadline is None else min(self.deadline, until)
            if running and self.deadline is not None and time.monotonic() >= self.deadline:
                if not self.terminated:
                    self._send(signal.SIGTERM)
                    self.terminated, self.deadline = True, time.monotonic() + GRACE_S
                else:
                    self._send(signal.SIGKILL)
            time.sleep(POLL_S)
        failed = [c for c in self.ended if c not in (0, EXIT_RESUME)]
        return failed[0] if failed else (EXIT_RESUME if EXIT_RESUME in self.ended else 0)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m resure_ds.node", description=__doc__.split("\n\n")[0])
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--nproc", type=int, help="ranks on this machine (one node)")
    p.add_argument("--hostfile", help="several nodes: `HOST slots=N` lines")
    p.add_argument("--node-rank", type=int, default=0, help="with --hostfile: this node's line, from 0")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="what each rank runs")
    args = p.parse_args(argv)
    if (args.nproc is None) == (args.hostfile is None):
        p.error("give --nproc or --hostfile")
    if not args.cmd:
        p.error("give the command each rank runs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        hosts = read_hostfile(args.hostfile) if args.hostfile else [("localhost", args.nproc)]
        envs = rank_envs(hosts, args.node_rank if args.hostfile else 0, args.master_addr, args.master_port)
    except LaunchError as e:
        print(f"[resure_ds] error: {e}", file=sys.stderr)
        return 2
    print(f"[resure_ds] node {args.node_rank if args.hostfile else 0} of {len(hosts)} node(s): ranks "
          f"{envs[0]['RANK']} to {envs[-1]['RANK']} of {envs[0]['WORLD_SIZE']}", file=sys.stderr, flush=True)
    node = Node()
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, node.on_signal)
    node.start(args.cmd, envs)
    return node.wait()


if __name__ == "__main__":
    sys.exit(main())
