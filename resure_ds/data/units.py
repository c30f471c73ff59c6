"""Rendering units into token shards: one unit in this process or in a pool of worker processes
(data/prepare.py decides which units and where their shards go). Each finished unit leaves its shard
(<partial>/<index>.arrow) and then its record (<partial>/units/<index>.json, its counts, size and
SHA-256), so an interrupted prepare resumes from the records.
"""
from __future__ import annotations

import itertools
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from ..config import Config
from ..errors import DataError
from ..files import write_json
from ..models import load_tokenizer
from . import overflow
from .manifest import file_digest
from .overflow import OverflowCounts
from .records import SkipCounter, unit_dialogues
from .render import Renderer
from .shards import ShardWriter
from .sources import Unit

RENDER_BATCH = 256  # dialogues tokenized per Rust call


# -- one unit (in a worker process, or in this one) -----------------------------------
_W: dict = {}


def _setup(tokenizer, cfg_data: dict, tick) -> None:
    """This process's renderer: it tokenizes max_length tokens under cut, whole dialogues under split
    and drop (their rows are made from the whole rendering, data/overflow.py)."""
    L, policy = cfg_data["max_length"], cfg_data["overflow"]
    _W.update(renderer=Renderer(tokenizer, L if policy == "cut" else None, cfg_data["train_reasoning"]), max_length=L,
              overflow=policy, skip=cfg_data["skip_invalid"], tick=tick)


def _init_worker(model_path: str, chat_template: str | None, trust_remote_code: bool, cfg_data: dict,
                 queue) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; the pool is the parallelism
    _setup(load_tokenizer(model_path, chat_template, trust_remote_code), cfg_data,
           queue.put if queue is not None else None)


def _data_options(cfg: Config) -> dict:
    return {"max_length": cfg.data.max_length, "overflow": cfg.data.overflow, "skip_invalid": cfg.data.skip_invalid,
            "train_reasoning": cfg.data.train_reasoning}


def unit_record(partial_dir: str, index: int) -> str:
    return os.path.join(partial_dir, "units", f"{index:05d}.json")


def prepare_unit(unit: Unit, index: int, partial_dir: str) -> dict:
    """Render one unit into <partial_dir>/<index>.arrow; returns (and records) its counts."""
    r, skip, tick = _W["renderer"], _W["skip"], _W["tick"]
    skipped, over, t0, notes = SkipCounter(), OverflowCounts(), time.perf_counter(), dict(r.notes)
    writer = ShardWriter(os.path.join(partial_dir, f"{index:05d}.arrow"))
    no_trained = kept = 0
    dialogues = unit_dialogues(unit, skip, skipped)
    while True:
        batch = list(itertools.islice(dialogues, RENDER_BATCH))
        if not batch:
            break
        # template refusals are invalid records like the others: an error, or counted
        for ex in r.render_many(batch, skipped if skip else None):
            if ex is None:
                no_trained += 1
                continue
            rows = overflow.apply(ex, _W["overflow"], _W["max_length"], over)
            kept += bool(rows)
            for row in rows:
                writer.add(row)
        if tick is not None:
            tick(len(batch))
    writer.close()
    size, sha = file_digest(writer.path)
    stats = {"file": f"{index:05d}.arrow", "input": unit.path, "bytes": size, "sha256": sha,
             "dialogues": kept, "rows": writer.rows_written,
             "tokens": writer.tokens, "trained_tokens": writer.trained, "partial_turns": writer.partial,
             "no_trained_token": no_trained, "overflow": over.to_dict(), "skipped": dict(skipped),
             "reasoning_not_rendered": r.notes.get("reasoning_not_rendered", 0) - notes.get("reasoning_not_rendered", 0),
             "seconds": time.perf_counter() - t0}
    os.makedirs(os.path.dirname(unit_record(partial_dir, index)), exist_ok=True)
    write_json(unit_record(partial_dir, index), stats)  # tasks of several machines share the folder
    return stats


def _prepare_unit_in_worker(args) -> dict:
    return prepare_unit(*args)


# -- running the units ----------------------------------------------------------------
def run_units(todo: list[tuple[Unit, int, str]], workers: int, model_path: str, cfg: Config, tokenizer,
               progress: bool, after=None) -> None:
    """Prepare the units of `todo`; after(index, record) is called here as each one finishes."""
    from tqdm import tqdm

    after = after or (lambda i, record: None)
    bar = tqdm(desc="prepare", unit=" dlg", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    try:
        if workers <= 1 or len(todo) <= 1:
            _setup(tokenizer, _data_options(cfg), bar.update)
            for job in todo:
                after(job[1], prepare_unit(*job))
            return
        import multiprocessing as mp
        from queue import Empty

        ctx = mp.get_context("spawn")  # no fork of a process holding tokenizer threads
        queue = ctx.Queue()
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(model_path, cfg.model.chat_template, cfg.model.trust_remote_code,
                                           _data_options(cfg), queue)) as pool:
            index = {pool.submit(_prepare_unit_in_worker, job): job[1] for job in todo}
            pending = set(index)
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for f in done:
                        try:
                            after(index[f], f.result())  # a worker's DataError surfaces here, as it was raised
                        except BrokenProcessPool:
                            raise DataError("a prepare worker process died (killed, or out of memory?); run "
                                            "prepare again: finished units are kept, the rest resume. Fewer "
                                            "data.prepare_workers use less memory") from None
                    try:
                        while True:
                            bar.update(queue.get_nowait())
                    except Empty:
                        pass
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
    finally:
        bar.close()
