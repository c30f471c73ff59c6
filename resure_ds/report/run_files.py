"""What a run folder holds for the report to read: its config.json, metrics.jsonl and data counts."""
from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import DataError
from ..files import jsonl_rows, write_json

DATA_COUNTS = "data_counts.json"
PLOT_ROWS = 2000  # the plots draw at most 2 x this many steps, evenly spaced, and the last
PLOT_KEYS = ("step", "loss", "weighted_loss", "lr", "bucket_mean", "bucket_std", "bucket_n", "mean_weight",
             "frac_w_lt_1", "frac_w_lt_0.5")


def iter_metrics(run_dir: str) -> Iterator[dict]:
    """metrics.jsonl's rows, one at a time."""
    path = os.path.join(run_dir, "metrics.jsonl")
    for n, row in enumerate(jsonl_rows(path), 1):
        if not isinstance(row.get("step"), int):
            raise DataError(f"{path}: row {n} has no step number; the file was edited or damaged (the recipe "
                            "writes one object a step): restore it, or remove the row")
        yield row


def share_names(row: dict) -> list[str]:
    """The sources a metrics row gives a share to (source_share/<name>), by metric-safe name."""
    return [k.split("/", 1)[1] for k in row if k.startswith("source_share/")]


def _plotted(row: dict) -> dict:
    return {k: v for k, v in row.items() if k in PLOT_KEYS or k.startswith("source_share/")}


def has_a_step(run_dir: str) -> bool:
    return next(iter_metrics(run_dir), None) is not None


@dataclass
class Metrics:
    """What the report reads from metrics.jsonl, in one pass and in memory bounded by PLOT_ROWS (a
    week-long run logs a row per step: 163,656 rows held whole took 417 MB)."""
    rows: list[dict] = field(default_factory=list)  # for the plots: PLOT_KEYS and source_share/*
    val: list[dict] = field(default_factory=list)  # step and val_* of every validation
    last: list[dict] = field(default_factory=list)  # the last 5 rows, whole
    train_time_s: float = 0.0  # the sum of step times
    count: int = 0  # rows read

    @property
    def step(self) -> int:
        return self.last[-1]["step"]


def read_report_metrics(run_dir: str) -> Metrics:
    """Every stride-th row for the plots, the stride doubling whenever 2 x PLOT_ROWS are held, and the
    last row always; every validation; the last five rows whole."""
    m, stride, last = Metrics(), 1, deque(maxlen=5)
    for i, row in enumerate(iter_metrics(run_dir)):
        m.count += 1
        m.train_time_s += row.get("step_time_s", 0.0)
        last.append(row)
        if "val_loss" in row:
            m.val.append({k: v for k, v in row.items() if k == "step" or k.startswith("val_")})
        if i % stride == 0:
            m.rows.append(_plotted(row))
            if len(m.rows) >= 2 * PLOT_ROWS:
                m.rows, stride = m.rows[::2], stride * 2
    m.last = list(last)
    if last and (not m.rows or m.rows[-1]["step"] != last[-1]["step"]):
        m.rows.append(_plotted(last[-1]))
    return m


def read_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except ValueError as e:  # not JSON, not UTF-8
        raise DataError(f"{path}: not the run's config ({e}); the file was edited or damaged: restore it") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: not the run's config (a {type(cfg).__name__}, not a JSON object); the file was "
                        "edited or damaged: restore it")
    return cfg


SOURCES = "sources.json"  # the raw files the run trained on (fingerprints), for the filter


def write_sources(run_dir: str, sources: list[dict]) -> None:
    write_json(os.path.join(run_dir, SOURCES), sources)


def read_sources(run_dir: str) -> dict[str, list] | None:
    """name -> recorded file fingerprints, or None for a run folder of a version that kept none."""
    try:
        with open(os.path.join(run_dir, SOURCES), encoding="utf-8") as f:
            return {s["name"]: s["files"] for s in json.load(f)}
    except FileNotFoundError:
        return None
