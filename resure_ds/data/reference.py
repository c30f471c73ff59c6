"""Reference losses beside a prepared folder: each trained turn's loss under a reference model,
scored once (resure_ds/eval/score.py) and read by training when stats.reference is set.

    <prepared folder>/reference-<key>/
        turn_loss.npy   float32, per dialogue (row order of the shards) one entry per turn id:
                        the reference model's mean token NLL of that turn (NaN: no trained token)
        offsets.npy     int64 [rows + 1]: dialogue i's entries are turn_loss[offsets[i]:offsets[i+1]]
        reference.json  what they were scored from: the reference model's fingerprint, the shards'
                        SHA-256 sums, the dtype, counts

The key hashes the reference model's fingerprint (its files' names, sizes and first and last MiB),
the scoring dtype and the prepared shards' SHA-256 sums: another reference model, or shards
prepared again, find no scores and are refused until scored (never scores of something else).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

from ..config import Config
from ..errors import DataError
from ..models import resolve_model_path
from .manifest import read_manifest
from .publish import publish_reference

REFERENCE_FORMAT = "resure-ds-reference"
REFERENCE_VERSION = 1
_EDGE = 1 << 20  # bytes hashed at each end of a model file


def model_fingerprint(model_dir: str) -> dict:
    """A model folder's identity for cache keys: per file (weights, config, tokenizer) its name,
    size and the SHA-256 of its first and last MiB. The same files copied elsewhere keep it."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"stats.reference={model_dir}: no such folder; give a local Hugging Face model "
                                "folder (a hub id is not scored: download it first), or base for model.path")
    files = {}
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path) or name.startswith("."):
            continue
        size = os.path.getsize(path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read(_EDGE))
            if size > 2 * _EDGE:
                f.seek(size - _EDGE)
                h.update(f.read(_EDGE))
        files[name] = [size, h.hexdigest()[:16]]
    if "config.json" not in files:
        raise FileNotFoundError(f"stats.reference={model_dir}: not a Hugging Face model folder (no config.json)")
    return {"files": files}


def reference_model(cfg: Config, model_path: str) -> str:
    """stats.reference as a model folder: `base` is the run's own model (model.path, resolved)."""
    ref = cfg.stats.reference
    return model_path if ref == "base" else resolve_model_path(ref)


def reference_key(fingerprint: dict, dtype: str, manifest: dict) -> str:
    """dtype: model.dtype as configured (auto, fp32, bf16): the key must not depend on which
    machine scores, so the resolved dtype is recorded in reference.json, not keyed."""
    blob = json.dumps({"version": REFERENCE_VERSION, "model": fingerprint, "dtype": dtype,
                       "shards": [s["sha256"] for s in manifest["shards"]]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def reference_folder(prepared: str, key: str) -> str:
    return os.path.join(prepared, f"reference-{key}")


def published(folder: str) -> bool:
    """Scores are there once their reference.json is (the folder appears whole, by a rename)."""
    return os.path.exists(os.path.join(folder, "reference.json"))


def write_reference(folder: str, losses: list[np.ndarray], meta: dict) -> None:
    """Per row (in order) its per-turn reference losses -> `folder`, which appears complete
    (rename) or not at all. If another process published it first, theirs is kept."""
    tmp = f"{folder}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    offsets = np.zeros(len(losses) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in losses], out=offsets[1:])
    flat = np.concatenate(losses).astype(np.float32) if losses else np.zeros(0, np.float32)
    np.save(os.path.join(tmp, "turn_loss.npy"), flat)
    np.save(os.path.join(tmp, "offsets.npy"), offsets)
    with open(os.path.join(tmp, "reference.json"), "w", encoding="utf-8") as f:
        json.dump({"format": REFERENCE_FORMAT, "version": REFERENCE_VERSION, "rows": len(losses),
                   "turns": int(np.isfinite(flat).sum()), **meta}, f, indent=2)
    try:
        os.replace(tmp, folder)
    except OSError:
        if not published(folder):
            raise
        shutil.rmtree(tmp)  # the same scores, published by another process of this machine
    publish_reference(folder)  # beside a copy of a folder in an object store: there too, for the other nodes


def scored_keys(cfg: Config, model_path: str, prepared: list) -> tuple[str, dict, list[str], list[bool]]:
    """stats.reference against prepared sources (each with .folder and .manifest): the reference
    model folder, its fingerprint, and per source the key of its scores and whether they are there."""
    ref = reference_model(cfg, model_path)
    fp = model_fingerprint(ref)
    m = cfg.model  # a products setting other than auto is part of the configured precision
    precision = m.dtype if m.bf16_matmul == "auto" else f"{m.dtype}, bf16_matmul={m.bf16_matmul}"
    keys = [reference_key(fp, precision, p.manifest) for p in prepared]
    return ref, fp, keys, [published(reference_folder(p.folder, k)) for p, k in zip(prepared, keys)]


class ReferenceLosses:
    """A prepared folder's reference losses (memory-mapped): turns(i) -> float32 [turns of dialogue i]."""

    def __init__(self, prepared: str, key: str):
        self.folder = reference_folder(prepared, key)
        try:
            with open(os.path.join(self.folder, "reference.json"), encoding="utf-8") as f:
                self.meta = json.load(f)
            self.loss = np.load(os.path.join(self.folder, "turn_loss.npy"), mmap_mode="r")
            self.offsets = np.load(os.path.join(self.folder, "offsets.npy"), mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{self.folder}: unreadable reference losses ({e}); delete the folder and score "
                            "again (resure-ds score RECIPE)") from None
        rows = read_manifest(prepared)["counts"]["rows"]
        if self.meta.get("version") != REFERENCE_VERSION or len(self.offsets) != rows + 1 \
                or int(self.offsets[-1]) != len(self.loss):
            raise DataError(f"{self.folder}: reference losses for {len(self.offsets) - 1} rows, the prepared "
                            f"folder holds {rows} (damaged or of another version); delete it and score again "
                            "(resure-ds score RECIPE)")
        finite = int(np.isfinite(self.loss).sum())  # one pass at open, not a failure deep in a loader worker
        if finite != self.meta.get("turns"):
            raise DataError(f"{self.folder}: {finite:,} finite reference losses where {self.meta.get('turns')} trained "
                            "turns were scored (NaN or infinite values written over the file since); delete the "
                            "folder and score again (resure-ds score RECIPE)")

    def turns(self, i: int) -> np.ndarray:
        return np.asarray(self.loss[self.offsets[i]:self.offsets[i + 1]])
