"""Score prepared shards with a reference model, once: each trained turn's loss under it, written
beside the shards (data/reference.py) for stats.reference (docs/method.md s.8).

    python -m resure_ds.eval.score [RECIPE.yaml] [key=value ...] [--batch-tokens N]
    resure-ds score RECIPE.yaml [key=value ...]

The same recipe and overrides as training: the data is prepared (a cache hit when it is), then
every source without scores of this reference model is scored; scores already there are reused.
launch/train.sh runs this before it starts the ranks when scores are missing.

On several GPUs or machines, start one task per GPU with --tasks-from-env (torchrun, srun, mpirun):
task k scores the dialogues i with i % tasks == k and writes its part; task 0 waits for every part
and publishes the scores. A task's finished part is kept, so a stopped scoring resumes.

    torchrun --nproc-per-node 8 -m resure_ds.eval.score RECIPE.yaml --tasks-from-env

A turn's reference loss is the mean token NLL over exactly the tokens training trains it on (the
same rows, the same spans, cut at data.max_length), so at the first step of a run whose reference
is its own base model (stats.reference=base) every excess loss is close to zero.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from ..config import Config, ConfigError, load_config, recipe_parser, split_recipe_args
from ..data.collate import collate
from ..data.prepare import Prepared, ensure_prepared, log, task_of_env
from ..data.reference import published, reference_folder, scored_keys, write_reference
from ..data.shards import PreparedSource
from ..errors import DataError, run_command
from ..models import causal_lm, load_tokenizer, resolve_model_path
from ..runtime import fused
from ..runtime import bf16
from ..runtime.engine import native_bf16, resolve_dtype
from ..runtime.nll import token_nll
from ..stats.turns import shift_targets, turn_losses

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BATCH_TOKENS = 8192  # padded tokens per forward: the logits of a batch are [tokens, vocab]


def _batches(src: PreparedSource, rows: np.ndarray, batch_tokens: int):
    """This task's rows, longest first, in padded batches of at most batch_tokens (one row at least)."""
    order = rows[np.argsort(-src.lengths[rows], kind="stable")]
    i = 0
    while i < len(order):
        longest = int(src.lengths[order[i]])
        n = max(1, batch_tokens // max(longest, 1))
        yield order[i:i + n]
        i += n


@torch.no_grad()
def score_rows(model, src: PreparedSource, rows: np.ndarray, pad_id: int, batch_tokens: int = BATCH_TOKENS,
               progress=None) -> dict[int, np.ndarray]:
    """Dialogue index -> float32 [turns]: the model's mean token NLL of each turn (NaN where the turn has
    no trained token). A non-finite loss of a trained turn is an error naming the dialogue."""
    dev = next(model.parameters()).device
    out: dict[int, np.ndarray] = {}
    for idx in _batches(src, rows, batch_tokens):
        dlgs = [src.row(int(i)) for i in idx]
        b = collate([[d] for d in dlgs], pad_id, packed=False)
        tg = shift_targets(b["labels"].to(dev), b["turn_ids"].to(dev), b["doc_ids"].to(dev))
        inputs = {"input_ids": b["input_ids"].to(dev), "attention_mask": b["attention_mask"].to(dev),
                  "use_cache": False}
        nll = model(**inputs, targets=tg.labels) if getattr(model, "fused", False) else \
            token_nll(model(**inputs).logits, tg.labels)
        turns = turn_losses(nll, tg, len(dlgs), b["partial"].shape[1])
        mean = turns.mean.cpu().numpy()
        bad = (turns.count.cpu().numpy() > 0) & ~np.isfinite(mean)
        if bad.any():
            d = int(np.flatnonzero(bad.any(1))[0])
            raise DataError(f"{src.folder}: the reference model's loss of dialogue {dlgs[d].dialogue_id} is not "
                            "finite; check the reference model (stats.reference) and its dtype (model.dtype)")
        for k, (i, d) in enumerate(zip(idx.tolist(), dlgs)):
            out[i] = mean[k, :len(d.partial)].astype(np.float32)
        if progress is not None:
            progress(len(idx))
    return out


def _part(folder: str, me: int, tasks: int) -> str:
    return os.path.join(f"{folder}.parts", f"part-{me:05d}-of-{tasks:05d}.npz")


def _save_part(path: str, scores: dict[int, np.ndarray]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    idx = np.array(sorted(scores), dtype=np.int64)
    lens = np.array([len(scores[i]) for i in idx.tolist()], dtype=np.int64)
    flat = np.concatenate([scores[i] for i in idx.tolist()]) if len(idx) else np.zeros(0, np.float32)
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, idx=idx, lens=lens, flat=flat)
    os.replace(tmp, path)


def _load_part(path: str) -> dict[int, np.ndarray]:
    z = np.load(path)
    ends = np.cumsum(z["lens"])
    return {int(i): z["flat"][e - n:e] for i, n, e in zip(z["idx"], z["lens"], ends)}


def _wait(paths: list[str], wait_s: float) -> None:
    deadline = time.time() + wait_s
    while missing := [p for p in paths if not os.path.exists(p)]:
        if time.time() > deadline:
            raise DataError(f"after {wait_s:.0f} s, {len(missing)} scoring task(s) have not written their part "
                            f"(first: {missing[0]}); is every task running? Run the command again to resume")
        time.sleep(1.0)


@dataclass
class Scorer:
    """One reference model scoring prepared sources: what every source's scoring shares."""
    model: Any
    ref_dir: str             # the reference model's folder
    fingerprint: dict        # its files' fingerprint (data/reference.py)
    cfg: Config
    dtype: str               # bf16 or fp32, resolved
    matmul: str              # how bf16 products are computed, resolved (runtime/bf16.py)
    pad_id: int
    task: tuple[int, int] = (0, 1)  # (this task, tasks): each scores every tasks-th row
    batch_tokens: int = BATCH_TOKENS
    wait_s: float = 86400    # how long task 0 waits for the others' parts
    progress: bool = True


def score_source(p: Prepared, key: str, s: Scorer) -> str | None:
    """Scores of one prepared source by this reference model under `key` (reused when there); returns
    the key (None on tasks other than 0, which only write their part)."""
    folder = reference_folder(p.folder, key)
    # one process of this machine scores, the others wait and reuse (tasks of a multi-task scoring
    # split the dialogues instead)
    with FileLock(folder + ".lock") if s.task[1] == 1 else contextlib.nullcontext():
        if published(folder):
            return key
        return _score_share(p, folder, key, s)


def _score_share(p: Prepared, folder: str, key: str, s: Scorer) -> str | None:
    me, tasks = s.task
    part = _part(folder, me, tasks)
    if not os.path.exists(part):
        src = PreparedSource(p.folder)
        rows = np.arange(me, len(src), tasks, dtype=np.int64)
        from tqdm import tqdm

        t0 = time.perf_counter()
        with tqdm(total=len(rows), desc=f"score {p.spec.label}", unit=" row", disable=not s.progress) as bar:
            with bf16.products(s.matmul):
                scores = score_rows(s.model, src, rows, s.pad_id, s.batch_tokens, bar.update)
        _save_part(part, scores)
        if s.progress:
            log(f"scored {len(rows):,} rows (dialogues, or windows of a split one) of {p.spec.label} in "
                f"{time.perf_counter() - t0:.1f} s")
    if me != 0:
        return None
    parts = [_part(folder, k, tasks) for k in range(tasks)]
    _wait(parts, s.wait_s)
    scores: dict[int, np.ndarray] = {}
    for path in parts:
        scores.update(_load_part(path))
    n = p.manifest["counts"]["rows"]
    if sorted(scores) != list(range(n)):
        raise DataError(f"{folder}.parts: the parts score {len(scores)} of {n} rows; delete the folder and "
                        "score again")
    write_reference(folder, [scores[i] for i in range(n)],
                    {"reference": s.ref_dir, "fingerprint": s.fingerprint, "dtype": s.dtype, "matmul": s.matmul,
                     "config_dtype": s.cfg.model.dtype, "prepared_key": p.manifest.get("key"), "tasks": tasks})
    for path in parts:
        os.remove(path)
    os.rmdir(f"{folder}.parts")
    return key


def load_reference(ref_dir: str, dtype: str, cfg: Config, matmul: str = "native"):
    dev = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
           else torch.device("cpu"))
    model = causal_lm(ref_dir, dtype=DTYPES[dtype], trust_remote_code=cfg.model.trust_remote_code).to(dev).eval()
    with bf16.products(matmul):
        model.fused = cfg.model.fused_loss != "false" and fused.fusable(model) is None and _fused_agrees(model, dev)
    return model


@torch.no_grad()
def _fused_agrees(model, dev) -> bool:
    """The fused head (the LM head on trained positions only, no [tokens, vocab] logits) on a probe
    batch gives the model's own NLL: else the model changes its logits after the head (soft-capping,
    scaling) and the logits path scores it."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g).to(dev)
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    want = token_nll(model(input_ids=ids, use_cache=False).logits, targets)
    fused.install(model)  # without targets the installed head is the model's own Linear: nothing to undo
    return torch.allclose(model(input_ids=ids, use_cache=False, targets=targets), want, rtol=1e-2, atol=1e-2)


def score_all(cfg: Config, task: tuple[int, int] = (0, 1), batch_tokens: int = BATCH_TOKENS,
              progress: bool = True) -> list[str | None]:
    """Every source of data.train prepared and scored by stats.reference; per source its key."""
    if cfg.stats.reference is None:
        raise ConfigError("stats.reference is not set: nothing to score (set it to a model folder, or base for "
                          "model.path)")
    model_path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(model_path, cfg.model.chat_template, cfg.model.trust_remote_code)
    # every task needs every prepared source: one process prepares (file-locked), the others wait
    prepared = ensure_prepared(cfg, tok, model_path, progress=progress and task[0] == 0)
    ref_dir, fp, keys, there = scored_keys(cfg, model_path, prepared)
    dtype = resolve_dtype(cfg)
    matmul = bf16.resolve(cfg.model.bf16_matmul, dtype, native_bf16())
    model = load_reference(ref_dir, dtype, cfg, matmul) if not all(there) else None
    if model is not None and progress:
        log(f"scoring {there.count(False)} source(s) with the reference model {ref_dir} ({dtype})")
    scorer = Scorer(model, ref_dir, fp, cfg, dtype, matmul, tok.pad_token_id, task, batch_tokens,
                    progress=progress and task[0] == 0)
    return [key if ok else score_source(p, key, scorer) for p, key, ok in zip(prepared, keys, there)]


def main(argv: list[str] | None = None) -> int:
    ap = recipe_parser(__doc__)
    ap.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS, help="padded tokens per forward")
    ap.add_argument("--tasks-from-env", action="store_true",
                    help="one of several tasks (torchrun, srun, mpirun): score a share of the dialogues")
    a = ap.parse_intermixed_args(argv)

    def body() -> None:
        cfg = load_config(*split_recipe_args(a.args))
        task = task_of_env() if a.tasks_from_env else (0, 1)
        for key in score_all(cfg, task, a.batch_tokens):
            if key is not None:
                print(key)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
