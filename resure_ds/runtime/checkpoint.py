"""Checkpoint layout, save and resume. Everything of ours is JSON (nothing executes on load).

    <run>/checkpoints/
      latest                    the tag a resume takes (moved last by every publish)
      step0000012/              DeepSpeed's model, optimizer and scheduler files, plus
        rank_state_00000.json   this rank's RNG states
        progress.json           step, data cursor, Welford and histogram state, world size,
                                the prepared data it trained on, and the inventory of every
                                file of the tag with its size
      step0000012.saving/       a save in progress (never resumed from)
      step0000012.universal/    DeepSpeed universal form, made when resuming on another
                                number of ranks (ZeRO 1-3 partitions depend on it)

Publish, then rotate: every rank writes into <tag>.saving; after a barrier,
rank 0 checks that every rank's files are there and not empty, writes
progress.json with the inventory, renames the folder to <tag> (atomic on
one filesystem), then moves `latest`, and only then deletes the tags
published before the last keep_last (by publish order; never the one
`latest` names). A job killed at any point of a save resumes from the
previous published tag; checkpoint.resume=auto takes exactly `latest`.
On resume the inventory is checked first: a missing or truncated file is
named, instead of failing deep inside a loader. (A checkpoint folder is
assumed to be on a filesystem every node sees, as DeepSpeed also assumes
for its universal conversion.)

Nothing in progress.json depends on the number of ranks: the data position is
a global cursor (data/order.py), the statistics are identical on every rank.
Resuming on another world size continues from the same global position; the
RNG streams are reseeded, so only the same world size continues bit-exact.
(The turn audit is not in the checkpoint: it is a log on disk, cut back to the
resumed step; audit.py.)
"""
from __future__ import annotations

import contextlib

import json
import os
import random
import shutil
from dataclasses import dataclass, field

import numpy as np
import torch

from ..files import write_json as _write_json, write_text as _write_atomic
from .. import dist
from . import faults

PROGRESS = "progress.json"




def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def rank_state_name(rank: int) -> str:
    return f"rank_state_{rank:05d}.json"


def rank_state_path(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, rank_state_name(rank))


# -- RNG states as JSON ------------------------------------------------------------
def rng_state() -> dict:
    py = random.getstate()
    npy = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
            "torch": torch.get_rng_state().tolist()}


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def set_rng_state(st: dict) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))


# -- what a checkpoint holds besides DeepSpeed's files ----------------------------------
@dataclass
class Progress:
    """The training progress a resume restores: the same on every rank, JSON in progress.json."""
    step: int
    cursor: dict                 # data/order.py Cursor.to_dict(): the global data position
    world_size: int
    global_batch: int
    data: list[dict]             # what the cursor points into (data/pipeline.py identity)
    method: dict                 # stats/method.py Method.state_dict(): statistics, reliability, mixture
    best_val: float | None = None  # lowest validation loss so far (eval.keep_best)
    trained_on: dict = field(default_factory=dict)  # model shape, seed, packing: what resume must match

    def to_json(self) -> dict:
        return {"step": self.step, "cursor": self.cursor, "world_size": self.world_size,
                "global_batch": self.global_batch, "data": self.data, "best_val": self.best_val,
                "method": self.method, "trained_on": self.trained_on}

    @classmethod
    def from_json(cls, d: dict) -> "Progress":
        return cls(d["step"], d["cursor"], d["world_size"], d.get("global_batch", 0), d["data"],
                   d["method"], d.get("best_val"), d.get("trained_on", {}))


def trained_on(cfg, shape_config: dict) -> dict:
    """The settings a checkpoint was trained with that a resume must keep (differences names any that
    changed): the model's shape and the options that change partitions, data order or the method's state."""
    return {"model": shape_config, "model.lora.rank": cfg.model.lora.rank, "train.seed": cfg.train.seed,
            "data.packing": cfg.data.packing, "data.pack_window": cfg.data.pack_window,
            "train.zero_stage": cfg.train.zero_stage, "stats.signals": cfg.stats.signals,
            "data.mixture": cfg.data.mixture}


def differences(saved: dict, now: dict) -> list[str]:
    """'key: checkpoint A, this run B' for every key whose value differs (keys only one side has are
    not compared)."""
    return [f"{k}: checkpoint {saved[k]!r}, this run {now[k]!r}" for k in sorted(saved.keys() & now.keys())
            if saved[k] != now[k]]


# -- save -------------------------------------------------------------------------------
SAVING = ".saving"


def staging(tag: str) -> str:
    return tag + SAVING


def inventory(folder: str) -> dict[str, int]:
    """Every file under a tag folder (relative path -> size), progress.json aside."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            if rel != PROGRESS:
                out[rel] = os.path.getsize(full)
    return out


def write_rank_state(ckpt_dir: str, tag: str, rank: int, state: dict) -> None:
    _write_json(rank_state_path(ckpt_dir, tag, rank), state)


def check_staged(have: dict[str, int], world: int) -> list[str]:
    """Problems of a staged save (its inventory): a rank's state missing, or an empty file."""
    problems = [f"{rank_state_name(k)} missing" for k in range(world) if rank_state_name(k) not in have]
    problems += [f"{name} is empty" for name, size in have.items() if size == 0]
    if not any(n.endswith(".pt") for n in have):
        problems.append("no DeepSpeed model or optimizer file")
    return problems


def save(engine, ckpt_dir: str, progress: Progress, rank: int, world: int, keep_last: int) -> None:
    """Every rank writes into <tag>.saving; rank 0 verifies and publishes, then rotates."""
    tag = f"step{progress.step:07d}"
    if rank == 0:
        clear_staging(ckpt_dir)
    dist.barrier()
    with write_errors(os.path.join(ckpt_dir, staging(tag))):
        engine.save(ckpt_dir, staging(tag))
        write_rank_state(ckpt_dir, staging(tag), rank, {"rng": rng_state()})
    faults.point("save", progress.step, rank)
    dist.barrier()
    if rank == 0:
        publish(ckpt_dir, tag, progress, world)
        rotate(ckpt_dir, keep_last)
    dist.barrier()


@contextlib.contextmanager
def write_errors(where: str):
    """Whatever the library raises while writing a checkpoint (torch.save reports a full disk as a
    RuntimeError, 'unexpected pos'), an OSError that names the folder and the error, so the run ends
    with the clear message about output.dir instead of a traceback."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        said = str(e).splitlines()[0] if str(e) else repr(e)
        raise OSError(f"writing {where} failed ({type(e).__name__}: {said})") from e


def publish(ckpt_dir: str, tag: str, progress: Progress, world: int) -> None:
    """Rank 0, after every rank wrote into <tag>.saving: verify, complete, rename, move `latest`."""
    tmp, final = os.path.join(ckpt_dir, staging(tag)), os.path.join(ckpt_dir, tag)
    have = inventory(tmp)
    problems = check_staged(have, world)
    if problems:
        raise RuntimeError(f"checkpoint {tmp} is incomplete ({'; '.join(problems)}); it was not published, "
                           "the previous checkpoint stays the one a resume uses")
    _write_json(os.path.join(tmp, PROGRESS), {**progress.to_json(), "files": have})
    if os.path.exists(final):  # the same step saved again (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(os.path.join(ckpt_dir, "latest"), tag)


def clear_staging(ckpt_dir: str) -> None:
    """Rank 0, before a save: remove what an interrupted save left."""
    if os.path.isdir(ckpt_dir):
        for name in os.listdir(ckpt_dir):
            if name.endswith(SAVING):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def rotate(ckpt_dir: str, keep_last: int) -> None:
    """Rank 0, after a publish: delete all but the keep_last most recently published tags (and their
    universal forms). Never the one `latest` names. Publish order, not the step in the name: a new
    run in a used folder (checkpoint.resume=none) publishes lower steps than an old run left."""
    keep = {latest_tag(ckpt_dir)}
    for old in published(ckpt_dir)[:-keep_last]:
        if old not in keep:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
            shutil.rmtree(os.path.join(ckpt_dir, old + ".universal"), ignore_errors=True)


def published(ckpt_dir: str) -> list[str]:
    """Published tags, in the order they were published (progress.json is written last)."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if t.startswith("step") and "." not in t
            and os.path.exists(os.path.join(ckpt_dir, t, PROGRESS))]
    return sorted(tags, key=lambda t: (os.stat(os.path.join(ckpt_dir, t, PROGRESS)).st_mtime_ns, t))


def latest_tag(ckpt_dir: str) -> str | None:
    """The tag `latest` names (moved last by every publish), or None."""
    try:
        with open(os.path.join(ckpt_dir, "latest"), encoding="utf-8") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


# -- resume -------------------------------------------------------------------------------
@dataclass
class Found:
    ckpt_dir: str
    tag: str
    progress: Progress
    files: dict = field(default_factory=dict)  # the inventory: relative path -> size
    universal: bool = False  # DeepSpeed loads <tag>.universal (made for another world size)

    @property
    def ds_tag(self) -> str:
        return self.tag + ".universal" if self.universal else self.tag

    @property
    def path(self) -> str:
        return os.path.join(self.ckpt_dir, self.tag)


def find(ckpt_dir: str, spec: str) -> Found | None:
    """The checkpoint checkpoint.resume names: auto = the one `latest` names, if any."""
    if spec == "none":
        return None
    if spec == "auto":
        tag = latest_tag(ckpt_dir)
        if tag is None:
            return None
        if not os.path.exists(os.path.join(ckpt_dir, tag, PROGRESS)):
            raise FileNotFoundError(f"{ckpt_dir}/latest names {tag}, which is not a published checkpoint there; "
                                    "point checkpoint.resume at a step folder of this run, or start afresh "
                                    "with checkpoint.resume=none")
        return verified(ckpt_dir, tag)
    d, tag = os.path.dirname(spec.rstrip("/")), os.path.basename(spec.rstrip("/"))
    if not os.path.exists(os.path.join(d, tag, PROGRESS)):
        raise FileNotFoundError(f"checkpoint.resume={spec}: no published checkpoint there (no {PROGRESS}); "
                                "point it at a step folder under <run>/checkpoints/")
    return verified(d, tag)


REQUIRED = ("step", "cursor", "world_size", "data", "method", "files")


def verified(ckpt_dir: str, tag: str) -> Found:
    """The checkpoint at ckpt_dir/tag after checking its progress record and file inventory."""
    folder = os.path.join(ckpt_dir, tag)
    fix = (f"move {folder} aside to resume from the previous checkpoint, or start afresh with "
           "checkpoint.resume=none")
    try:
        progress = _read_json(os.path.join(folder, PROGRESS))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{folder}/{PROGRESS} cannot be read ({e}); {fix}") from None
    missing = [k for k in REQUIRED if k not in progress] if isinstance(progress, dict) else list(REQUIRED)
    if missing:
        raise FileNotFoundError(f"{folder}/{PROGRESS} lacks {missing} (not a checkpoint of this recipe "
                                f"version?); {fix}")
    have = inventory(folder)
    bad = [f"{n} missing" if n not in have else f"{n} has {have[n]} bytes, {size} were written"
           for n, size in progress["files"].items() if have.get(n) != size]
    if bad:
        raise FileNotFoundError(f"checkpoint {folder} is damaged: {'; '.join(bad[:5])}"
                                f"{' ...' if len(bad) > 5 else ''}; {fix}")
    return Found(ckpt_dir, tag, Progress.from_json(progress), progress["files"])


def load_rank_rng(found: Found, rank: int, world: int) -> dict | None:
    """This rank's RNG state if the world size is unchanged, else None (the caller reseeds)."""
    if found.progress.world_size != world:
        return None
    return _read_json(rank_state_path(found.ckpt_dir, found.tag, rank))["rng"]
