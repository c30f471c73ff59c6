"""Checkpoint layout, save and resume. Everything of ours is JSON (nothing executes on load).

    <run>/checkpoints/
      latest                    DeepSpeed's pointer to the newest tag
      step0000012/              DeepSpeed's model, optimizer and scheduler files, plus
        rank_state_00000.json   this rank's audit reservoir and RNG states
        progress.json           step, data cursor, Welford and histogram state, world size,
                                the prepared data it trained on; written last, by rank 0,
                                after every rank's files: a tag without it is incomplete
      step0000012.universal/    DeepSpeed universal form, made when resuming on another
                                number of ranks (ZeRO 1-3 partitions depend on it)

Nothing in progress.json depends on the number of ranks: the data position is
a global cursor (data/plan.py), the statistics are identical on every rank.
Resuming on another world size continues from the same global position; the
per-rank audit reservoirs are merged (old rank k -> new rank k % world) and
the RNG streams are reseeded, so only the same world size continues bit-exact.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass

import numpy as np
import torch

PROGRESS = "progress.json"


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def rank_state_path(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"rank_state_{rank:05d}.json")


# -- RNG states as JSON ------------------------------------------------------------
def rng_state() -> dict:
    py = random.getstate()
    npy = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(st: dict) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))


def tensor_to_json(t: torch.Tensor) -> list:
    return t.tolist()  # float64 -> Python floats: repr round-trips exactly


# -- save -------------------------------------------------------------------------------
def write_own(ckpt_dir: str, tag: str, rank: int, progress: dict, rank_state: dict, barrier) -> None:
    """After DeepSpeed's save: every rank writes its state, then rank 0 completes the tag."""
    _write_json(rank_state_path(ckpt_dir, tag, rank), rank_state)
    barrier()
    if rank == 0:
        _write_json(os.path.join(ckpt_dir, tag, PROGRESS), progress)
    barrier()


def rotate(ckpt_dir: str, keep_last: int) -> None:
    """Rank 0: delete all but the newest keep_last complete tags (and their universal forms)."""
    tags = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step") and "." not in t
                  and os.path.exists(os.path.join(ckpt_dir, t, PROGRESS)))
    for old in tags[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
        shutil.rmtree(os.path.join(ckpt_dir, old + ".universal"), ignore_errors=True)


# -- resume -------------------------------------------------------------------------------
@dataclass
class Found:
    ckpt_dir: str
    tag: str
    progress: dict
    universal: bool = False  # DeepSpeed loads <tag>.universal (made for another world size)

    @property
    def ds_tag(self) -> str:
        return self.tag + ".universal" if self.universal else self.tag

    @property
    def path(self) -> str:
        return os.path.join(self.ckpt_dir, self.tag)


def find(ckpt_dir: str, spec: str) -> Found | None:
    """The checkpoint checkpoint.resume names: auto = the newest complete tag in the run, if any."""
    if spec == "none":
        return None
    if spec == "auto":
        if not os.path.isdir(ckpt_dir):
            return None
        tags = sorted((t for t in os.listdir(ckpt_dir) if t.startswith("step") and "." not in t), reverse=True)
        for t in tags:
            if os.path.exists(os.path.join(ckpt_dir, t, PROGRESS)):
                return Found(ckpt_dir, t, _read_json(os.path.join(ckpt_dir, t, PROGRESS)))
        return None
    d, tag = os.path.dirname(spec.rstrip("/")), os.path.basename(spec.rstrip("/"))
    p = os.path.join(d, tag, PROGRESS)
    if not os.path.exists(p):
        raise FileNotFoundError(f"checkpoint.resume={spec}: no complete checkpoint there (no {PROGRESS}); "
                                "point it at a step folder under <run>/checkpoints/")
    return Found(d, tag, _read_json(p))


def load_rank_state(found: Found, rank: int, world: int) -> tuple[dict | None, list[dict]]:
    """(this rank's RNG state if the world size is unchanged, else None; the audit states it takes over)."""
    old_world = found.progress["world_size"]
    mine = [k for k in range(old_world) if k % world == rank]
    states = [_read_json(rank_state_path(found.ckpt_dir, found.tag, k)) for k in mine]
    rng = states[0]["rng"] if old_world == world and states else None
    return rng, [s["audit"] for s in states]
