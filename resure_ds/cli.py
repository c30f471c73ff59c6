"""The `resure-ds` command (installed with the package):

    resure-ds train   [RECIPE.yaml] [key=value ...]    launch/train.sh: all ranks of this node
    resure-ds prepare [RECIPE.yaml] [key=value ...]    tokenize the data into prepared shards once
    resure-ds score   [RECIPE.yaml] [key=value ...]    reference losses beside the shards (stats.reference)
    resure-ds plan    [RECIPE.yaml] [key=value ...] [--gpus N --gpu-memory GB --nodes M]   memory per GPU, fits?
    resure-ds eval    EXPORT DATA [--holdout F] ...    held-out per-turn loss of an exported model
    resure-ds report  RUN [--export P | --filter OUT --min-weight W]   report.html, the verdict

Each subcommand takes the same arguments as the module or script it runs (`resure-ds SUB --help`).
"""
from __future__ import annotations

import os
import subprocess
import sys

from .config import CLONE as ROOT, markdown_table
MODULES = {"prepare": "resure_ds.data.prepare", "score": "resure_ds.eval.score", "plan": "resure_ds.plan", "eval": "resure_ds.eval", "report": "resure_ds.report"}


def recipes() -> list[str]:
    folder = os.path.join(ROOT, "recipes")
    return sorted(f for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []


def usage() -> str:
    lines = [__doc__.strip(), "", "Recipes (" + os.path.join(ROOT, "recipes") + "):"]
    for name in recipes():
        with open(os.path.join(ROOT, "recipes", name), encoding="utf-8") as f:
            head = [ln[1:].strip() for ln in f if ln.startswith("#")][2:]  # after the command line
        about = " ".join(head[:head.index("")] if "" in head else head)
        lines.append(f"  recipes/{name:<21} {about[:150]}{'...' if len(about) > 150 else ''}")
    lines += ["", "Options (key=value; defaults of resure_ds/config/sections.py):", markdown_table()]
    return "\n".join(lines)


def train(args: list[str]) -> int:
    script = os.path.join(ROOT, "launch", "train.sh")
    if not os.path.exists(script):
        print(f"resure-ds: {script} not found: `resure-ds train` runs the repository's launcher; install the "
              "package from a clone (pip install -e <clone>)", file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    return subprocess.call(["bash", script, *args], env=env)  # load_config finds recipes/x.yaml from anywhere


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    sub, rest = argv[0], argv[1:]
    if sub == "train":
        if rest[:1] in (["-h"], ["--help"]):
            print(usage())
            return 0
        return train(rest)
    if sub in MODULES:
        return subprocess.call([sys.executable, "-m", MODULES[sub], *rest])
    print(f"resure-ds: unknown command {sub!r}; one of: train, {', '.join(MODULES)} (resure-ds --help)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
