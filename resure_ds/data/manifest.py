"""A prepared folder's manifest.json: what it was made from, its shards and its counts."""
from __future__ import annotations

import json
import os

from ..config.sources import SourceSpec, parse_layout
from ..errors import DataError
from .sources import PREPARED_FORMAT

FORMAT_VERSION = 1  # of the prepared folder: shards and manifest


def write_manifest(folder: str, manifest: dict) -> None:
    tmp = os.path.join(folder, f"manifest.json.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": PREPARED_FORMAT, "version": FORMAT_VERSION, **manifest}, f, indent=2)
    os.replace(tmp, os.path.join(folder, "manifest.json"))


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{folder}: no readable manifest.json ({e}); prepare the data again "
                        "(python -m resure_ds.prepare RECIPE)") from None
    if m.get("format") != PREPARED_FORMAT or m.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: not a resure-ds prepared folder of format version {FORMAT_VERSION}; "
                        "prepare the data again (python -m resure_ds.prepare RECIPE)")
    return m


def manifest_source(folder: str) -> SourceSpec:
    """The raw source a prepared folder was made from (to find turn texts for reports)."""
    src = read_manifest(folder)["source"]
    lay = src.get("layout") or {}
    return SourceSpec(src["path"], layout=parse_layout(lay.get("format"), lay.get("columns"), "")[0])
