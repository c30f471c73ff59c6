"""The data a training run reads, wired once: the prepared sources, the held-out split, the
validation rows, this rank's batch stream, and what a checkpoint records about the data.

data.eval as a fraction is split here, once, by a hash of every dialogue id: the loader gets the
indices training may draw, validation the rows held out (the same list on every rank).
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from ..config import Config
from ..errors import DataError
from .loader import Corpus, RankBatches, Stream, make_loader
from .order import Cursor
from .prepare import Prepared, ensure_eval_prepared, ensure_prepared
from .reference import scored_keys
from .shards import PreparedSource


def holdout(cfg: Config) -> float | None:
    """data.eval as a held-out fraction of the training sources, else None."""
    return cfg.data.eval if isinstance(cfg.data.eval, float) else None


class TrainingData:
    def __init__(self, cfg: Config, tokenizer, model_path: str, rank: int):
        self.cfg, self.pad_id = cfg, tokenizer.pad_token_id
        # A cache hit when launch/train.sh prepared the data before starting the ranks; otherwise one
        # rank prepares (file-locked) while the others wait, before any collective.
        # Ranks check the shards' sizes; launch/train.sh's prepare step has checked their SHA-256 sums.
        self.prepared: list[Prepared] = ensure_prepared(cfg, tokenizer, model_path, progress=rank == 0,
                                                        checksums=False)
        frac = holdout(cfg)
        corpus = Corpus([p.folder for p in self.prepared]) if frac else None
        self.keep, held = corpus.split(frac) if corpus is not None else (None, None)
        empty = [p.spec.label for p, k in zip(self.prepared, self.keep or []) if len(k) == 0]
        if empty:
            raise DataError(f"data.eval={frac}: the held-out split takes every dialogue of {empty} "
                            f"({', '.join(str(p.manifest['counts']['dialogues']) for p in self.prepared)} dialogues "
                            "per source), so nothing of it is left to train on; lower data.eval, give a "
                            "validation source instead, or add data")
        self.validation_rows = self._validation_rows(tokenizer, model_path, corpus, held, rank)
        self.references = self._references(model_path) if cfg.stats.reference is not None else None

    def _references(self, model_path: str) -> list[str]:
        """stats.reference: per source the key of its reference losses, which must be there (scored by
        `resure-ds score`, which launch/train.sh runs when they are missing)."""
        cfg = self.cfg
        ref, _, keys, there = scored_keys(cfg, model_path, self.prepared)
        missing = [p.folder for p, ok in zip(self.prepared, there) if not ok]
        if missing:
            raise DataError(f"stats.reference={cfg.stats.reference}: no reference losses of {ref} "
                            f"(model.dtype={cfg.model.dtype}) beside the prepared data {', '.join(missing)}; score "
                            "them once with the same recipe and overrides: resure-ds score RECIPE [key=value ...] "
                            "(launch/train.sh does this before it starts the ranks)")
        return keys

    def _validation_rows(self, tok, model_path: str, corpus: Corpus | None, held: np.ndarray | None,
                         rank: int) -> list | None:
        """A prepared data.eval source, or the held-out rows of the training corpus (index order)."""
        cfg = self.cfg
        if cfg.data.eval is None:
            return None
        if corpus is None:
            src = PreparedSource(ensure_eval_prepared(cfg, tok, model_path, progress=rank == 0, checksums=False).folder)
            return [src.row(i) for i in range(len(src))]
        rows = [corpus.row(int(i))[1] for i in held]
        if not rows:
            raise DataError(f"data.eval={cfg.data.eval}: no dialogue of the training data falls in the held-out "
                            "split; raise the fraction or give a validation source")
        return rows

    @property
    def source_names(self) -> list[str]:
        return [p.spec.label for p in self.prepared]

    def batches(self, rank: int, world: int, cursor: Cursor, ignore_signals: tuple = ()) -> Iterator[dict]:
        """This rank's micro-batches from a global cursor on (background workers per data.num_workers)."""
        d, t = self.cfg.data, self.cfg.train
        stream = Stream([p.folder for p in self.prepared], [p.spec.weight for p in self.prepared], t.seed,
                        d.max_length, d.packing, d.pack_window, t.micro_batch_size, self.pad_id, self.keep,
                        self.references)
        return make_loader(RankBatches(stream, rank, world, cursor), d.num_workers, d.prefetch,
                           pin_memory=torch.cuda.is_available(), ignore_signals=ignore_signals)

    def identity(self) -> list[dict]:
        """What the data cursor points into: the prepared sources, their keys and weights, and the
        held-out validation fraction (it changes which dialogues are drawn)."""
        frac, refs = holdout(self.cfg), self.references or [None] * len(self.prepared)
        return [{"name": p.spec.label, "key": p.manifest.get("key", os.path.basename(p.folder)),
                 "weight": p.spec.weight, **({"holdout": frac} if frac else {}), **({"reference": r} if r else {})}
                for p, r in zip(self.prepared, refs)]

    def source_files(self) -> list[dict]:
        """Per source, the fingerprints of the raw files it was prepared from (path, size, mtime, head
        and tail hash): what the filter checks before it applies this run's verdict to them."""
        return [{"name": p.spec.label, "files": p.manifest["source"]["files"]} for p in self.prepared]

    def describe_change(self, saved: list[dict]) -> str:
        """What differs between a checkpoint's data identity and this run's, in the options' words."""
        now = self.identity()
        if [s["name"] for s in saved] != [s["name"] for s in now]:
            return f"sources {[s['name'] for s in saved]}, now {[s['name'] for s in now]} (data.train)"
        out = []
        for s, n in zip(saved, now):
            if s.get("key") != n.get("key"):
                out.append(f"{n['name']}: prepared as {s.get('key')}, now {n.get('key')} (its files, the tokenizer, "
                           "the chat template, data.max_length, data.overflow or data.skip_invalid changed)")
            if s.get("weight") != n.get("weight"):
                out.append(f"{n['name']}: weight {s.get('weight')}, now {n.get('weight')} (data.train)")
            if s.get("reference") != n.get("reference"):
                out.append(f"{n['name']}: reference losses {s.get('reference')}, now {n.get('reference')} "
                           "(stats.reference, its model files or model.dtype)")
            if s.get("holdout") != n.get("holdout"):
                out.append(f"{n['name']}: held-out fraction {s.get('holdout')}, now {n.get('holdout')} (data.eval)")
        return "; ".join(out)

    def counts(self) -> dict:
        """Over all sources (from their manifests): skipped records per kind, dialogues and rows, what
        data.overflow did, and dialogues left with no trained token."""
        skipped: dict[str, int] = {}
        out = {"overflow": {}, "dialogues": 0, "rows": 0, "no_trained_token": 0, "policy": self.cfg.data.overflow,
               "max_length": self.cfg.data.max_length}
        for p in self.prepared:
            c = p.manifest["counts"]
            for k, v in c["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
            for k in ("dialogues", "rows", "no_trained_token"):
                out[k] += c[k]
            for k, v in c["overflow"].items():
                out["overflow"][k] = out["overflow"].get(k, 0) + v
        return {"skipped": skipped, **out}
