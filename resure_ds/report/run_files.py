"""What a run folder holds for the report to read: its config.json, metrics.jsonl and data counts."""
from __future__ import annotations

import json
import os

DATA_COUNTS = "data_counts.json"


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def read_config(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)
