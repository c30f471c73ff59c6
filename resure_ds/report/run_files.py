"""What a run folder holds for the report to read: its config.json, metrics.jsonl and data counts."""
from __future__ import annotations

import json
import os

from ..files import write_json

DATA_COUNTS = "data_counts.json"


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def read_config(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


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
