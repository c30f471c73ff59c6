"""Validation held out of the training sources by a hash of the dialogue id (data.eval = a fraction).

A dialogue is held out when the first 8 bytes of blake2b(id) as a number in
[0, 1) fall below the fraction: the split does not depend on the seed, the
number of ranks, the order of the files or the other dialogues, so it stays
the same across runs, resumes and re-prepared shards of the same corpus.
Held-out dialogues are never drawn for training (plan.py keeps them out).
"""
from __future__ import annotations

import hashlib

import numpy as np


def held_out(dialogue_ids: list[str], fraction: float) -> np.ndarray:
    """Bool mask: which of these dialogues belong to the validation split."""
    cut = int(fraction * 2 ** 64)
    return np.fromiter((int.from_bytes(hashlib.blake2b(d.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                       "little") < cut for d in dialogue_ids), dtype=bool, count=len(dialogue_ids))
