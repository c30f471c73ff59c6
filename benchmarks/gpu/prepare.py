"""Prepare, on a machine with package registries, what the GPU check needs on a GPU machine that has none.

Writes .gpu/ at the repository root (git-ignored; carry it to the GPU machine):
  .gpu/wheels/     wheels of the packages the GPU image lacks (DeepSpeed built here as a pure
                   Python wheel: its CUDA ops are compiled just in time there; datasets; the
                   chitchat corpus; their small dependencies), for CPython --python (3.12)
  .gpu/smollm2/    SmolLM2's tokenizer and config (no weights: benchmarks/gpu/bench.py
                   initialises a larger Llama of the same family at random there)
  .gpu-model/      with --study: the embedded model's GGUF in parts of at most 24 MiB and their
                   MANIFEST.json (benchmarks/gpu/parts.py), for the noisy-mix study's gpu profile
Everything must stay under the 64 MiB that travels; the script checks (.gpu with one part).

    python benchmarks/gpu/prepare.py [--python 3.12] [--study]
then on the GPU machine (from the repository root, .gpu carried):
    bash benchmarks/gpu/run.sh
and for the study, one part per call (benchmarks/gpu/study.sh says how):
    bash benchmarks/gpu/study.sh
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, ".gpu")
LIMIT = 60 * 2 ** 20  # of the 64 MiB that travel; the repository itself takes the rest
# What the recipe needs beyond a PyTorch GPU image (torch, accelerate,
# pyarrow, mpi4py, pyyaml, filelock, tqdm, tensorboard, matplotlib, safetensors, numpy, psutil,
# ninja, py-cpuinfo, msgpack, einops, nvidia-ml-py are there). Pure Python unless listed in BINARY.
# Versions: those of this environment (the ones the suite passes with here).
PURE = ["transformers", "datasets", "dill", "hjson", "pydantic", "annotated-types", "typing-inspection", "chitchat-dataset",
        "gguf",  # gguf: the study converts the embedded model's GGUF there
        "trl"]  # bench.py's peer row (TRL's SFTTrainer); its version: benchmarks/requirements.txt
BINARY = ["pydantic-core", "multiprocess"]


def pinned(names: list[str]) -> list[str]:
    """name==version: this environment's version, or benchmarks/requirements.txt's pin for a
    benchmark's package that is not installed here."""
    from importlib.metadata import PackageNotFoundError, version

    with open(os.path.join(ROOT, "benchmarks", "requirements.txt"), encoding="utf-8") as f:
        pins = dict(ln.strip().split("==") for ln in f if "==" in ln and not ln.startswith("#"))
    out = []
    for n in names:
        try:
            out.append(f"{n}=={version(n)}")
        except PackageNotFoundError:
            out.append(f"{n}=={pins[n]}")
    return out


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default="3.12", help="the GPU image's CPython version")
    ap.add_argument("--study", action="store_true", help="also .gpu-model/: the embedded GGUF in parts")
    a = ap.parse_args()
    wheels = os.path.join(OUT, "wheels")
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(wheels)
    pip("download", "-q", "--no-deps", "-d", wheels, *pinned(PURE))
    plat = ["--only-binary=:all:", "--python-version", a.python, "--implementation", "cp"]
    for p in ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64"):
        plat += ["--platform", p]
    pip("download", "-q", "--no-deps", "-d", wheels, *plat, *pinned(BINARY))
    with tempfile.TemporaryDirectory() as tmp:  # DeepSpeed ships as source: a wheel with no ops prebuilt
        pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", tmp, *pinned(["deepspeed"]))
        env = {**os.environ, "DS_BUILD_OPS": "0"}
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels,
                        *glob.glob(os.path.join(tmp, "deepspeed-*"))], check=True, env=env)

    from resure_ds.models import EMBEDDED, resolve_model_path
    from transformers import AutoConfig, AutoTokenizer

    src = resolve_model_path(EMBEDDED)
    AutoTokenizer.from_pretrained(src).save_pretrained(os.path.join(OUT, "smollm2"))
    AutoConfig.from_pretrained(src).save_pretrained(os.path.join(OUT, "smollm2"))
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(OUT, "**"), recursive=True) if os.path.isfile(p))
    for p in sorted(os.listdir(wheels)):
        print(f"  {os.path.getsize(os.path.join(wheels, p)) / 2 ** 20:6.1f} MiB  {p}")
    print(f".gpu/: {size / 2 ** 20:.1f} MiB")
    if a.study:
        from benchmarks.gpu.parts import split
        from resure_ds.models import GGUF_NAME, _gguf_folder

        model_dir = os.path.join(ROOT, ".gpu-model")
        shutil.rmtree(model_dir, ignore_errors=True)
        names = split(os.path.join(_gguf_folder(), GGUF_NAME), model_dir, 24 * 2 ** 20)
        first = os.path.getsize(os.path.join(model_dir, names[0]))
        print(f".gpu-model/: {len(names)} parts ({', '.join(names)}), the first {first / 2 ** 20:.1f} MiB")
        size += first
    if size > LIMIT:
        sys.exit(f".gpu/ (with the first model part, if any) is {size / 2 ** 20:.1f} MiB, over the "
                 f"{LIMIT / 2 ** 20:.0f} MiB that may travel")


if __name__ == "__main__":
    main()
