"""Rank-0 step metrics (metrics.jsonl, TensorBoard, progress bar) and the
per-rank turn audit (a bounded reservoir sample, written at checkpoints)."""
from __future__ import annotations

import json
import os
import random


class MetricsLogger:
    """Rank 0 only: every step to metrics.jsonl (appended; truncated to the
    resumed step on resume), every log_every steps to TensorBoard."""

    def __init__(self, run_dir: str, total_steps: int, start_step: int, log_every: int, tensorboard: bool):
        from tqdm import tqdm

        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._truncate(start_step)
        self.f = open(self.path, "a", encoding="utf-8")
        self.log_every = log_every
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _truncate(self, start_step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= start_step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(keep)

    def log(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        step = row["step"]
        if self.tb is not None and step % self.log_every == 0:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
                elif isinstance(v, list) and k.startswith(("bucket_", "val_depth_")):
                    for b, x in enumerate(v):
                        if x == x:  # not NaN
                            self.tb.add_scalar(f"{k}/{b}", x, step)
        self.bar.update(1)
        if step % self.log_every == 0:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", w=f"{row['mean_weight']:.3f}",
                                 tok_s=f"{row['tokens_per_s']:.0f}")

    def close(self) -> None:
        self.bar.close()
        self.f.close()
        if self.tb is not None:
            self.tb.close()


class Audit:
    """Every trained turn's (dialogue_id, turn, loss, z, weight, warm, step, partial),
    kept as a uniform reservoir sample of at most max_rows per rank."""

    def __init__(self, run_dir: str, rank: int, max_rows: int, seed: int):
        self.dir = os.path.join(run_dir, "audit")
        self.path = os.path.join(self.dir, f"rank{rank:05d}.jsonl")
        self.max_rows, self.rows, self.seen = max_rows, [], 0
        self.rng = random.Random(seed * 7919 + rank)

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            self.seen += 1
            if len(self.rows) < self.max_rows:
                self.rows.append(r)
            else:
                j = self.rng.randrange(self.seen)
                if j < self.max_rows:
                    self.rows[j] = r

    def write(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in self.rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def drop_other_ranks(self, world: int) -> None:
        """After a resume on fewer ranks: the files of ranks that no longer exist (their rows
        were taken over by the remaining ranks) would be read twice."""
        if os.path.isdir(self.dir):
            for name in os.listdir(self.dir):
                if name.startswith("rank") and name.endswith(".jsonl") and int(name[4:9]) >= world:
                    os.remove(os.path.join(self.dir, name))

    def state_dict(self) -> dict:
        """JSON: the reservoir itself rides in the checkpoint, so a resumed run keeps the same sample."""
        v, st, g = self.rng.getstate()
        return {"seen": self.seen, "rng": [v, list(st), g], "rows": list(self.rows)}

    def load_state_dicts(self, sds: list[dict]) -> None:
        """One state (same world size: exact), or several reservoirs taken over after a resume on
        fewer ranks (merged: rows pooled, subsampled to max_rows, counts added)."""
        if not sds:
            return
        v, st, g = sds[0]["rng"]
        self.rng.setstate((v, tuple(st), g))
        self.seen = sum(sd["seen"] for sd in sds)
        self.rows = [r for sd in sds for r in sd["rows"]]
        if len(self.rows) > self.max_rows:
            self.rows = self.rng.sample(self.rows, self.max_rows)
