"""Where a training step's time goes, by sampling: py-spy on a real run of the recipe, one rank.

Runs one rank of the recipe under `py-spy record --format raw` and
credits every sample taken inside train.train_step to the phase of the
innermost recipe function on its stack (the same phases as the time_*_s
fields of metrics.jsonl, which time them with a clock): a check of the
clock by an independent method, and a way to see inside a phase (--top).
The trace is not kept; the method is this script.

    python benchmarks/profile_step.py [key=value ...] [--steps 6] [--top 15]
e.g. python benchmarks/profile_step.py model.fused_loss=false   # the logits path
Needs py-spy (benchmarks/requirements.txt).
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = 50  # samples per second
# innermost first: the first of these found walking the stack from the leaf names the phase
PHASES = [("_audit", "bookkeeping"), ("_accumulate", "bookkeeping"), ("sync_update", "collectives"),
          ("all_reduce_dict", "collectives"), ("global_token_count", "collectives"), ("weigh", "resure"),
          ("turn_losses", "resure"), ("weighted_loss_sum", "resure"), ("shift_targets", "resure"),
          ("token_nll", "forward"), ("backward", "backward"), ("step", "optimizer"), ("__next__", "data")]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phase_of(frames: list[str]) -> str | None:
    """frames root first, as py-spy writes them: 'function (file:line)'."""
    names = [f.split(" (")[0].strip() for f in frames]
    if "train_step" not in names:
        return None
    inner = names[names.index("train_step") + 1:]
    for fn in reversed(inner):
        for key, phase in PHASES:
            if fn == key or fn.endswith("." + key):
                return phase
    return "train_step itself"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="recipe overrides (key=value)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--top", type=int, default=12, help="leaf functions to list")
    a = ap.parse_args()
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if spy is None:
        sys.exit("py-spy is not installed: pip install -r benchmarks/requirements.txt")
    args = ["recipes/default.yaml", "train.zero_stage=0", "train.micro_batch_size=4", f"train.max_steps={a.steps}",
            "checkpoint.every=0", "checkpoint.keep_last=0", "checkpoint.export=false", "output.plot=false", "output.report=false",
            "output.report_to=none", "output.name=profile", *a.overrides]
    # One rank started the way the launcher starts it (launch/train.sh in rank mode execs this very
    # command): py-spy then samples the training process itself.
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "profile.txt")
        subprocess.run([spy, "record", "--format", "raw", "-r", str(RATE), "-o", raw, "--",
                        sys.executable, "-m", "resure_ds.train", *args], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        phases: collections.Counter = collections.Counter()
        leaves: collections.Counter = collections.Counter()
        with open(raw, encoding="utf-8") as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                frames = stack.split(";")
                ph = phase_of(frames)
                if ph is not None:
                    phases[ph] += int(count)
                    leaves[frames[-1].split(" (")[0]] += int(count)
    total = sum(phases.values())
    print(f"py-spy, {RATE} samples/s, inside train_step over {a.steps} steps ({total / RATE:.1f} s sampled):")
    for ph, n in phases.most_common():
        print(f"  {ph:18s} {n / RATE / a.steps:6.2f} s/step  {n / total:6.1%}")
    print("leaf functions:")
    for fn, n in leaves.most_common(a.top):
        print(f"  {n / total:6.1%}  {fn}")


if __name__ == "__main__":
    main()
