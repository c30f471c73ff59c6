"""What `data.train`, `data.format`, `data.columns` and `output.report_to` say, parsed and checked.

Pure parsing of configuration values (no file is opened here): the data layer
resolves these specs into files (data/sources.py), the runtime opens the
trackers (runtime/trackers.py).
"""
from __future__ import annotations

import math
import re

from dataclasses import dataclass
from typing import Any


FORMATS = ("auto", "openai", "sharegpt", "alpaca", "prompt_completion")
FIELDS = ("messages", "role", "content", "conversations", "from", "value", "instruction", "input", "output",
          "system", "prompt", "completion", "id", "tools", "tool_calls", "train", "weight", "reasoning_content")


@dataclass(frozen=True)
class Layout:
    """How a source's records are laid out: a format (auto = detected per record from its fields) and
    the names the source uses for our fields (data.columns), e.g. (("messages", "dialog"),)."""
    format: str = "auto"
    columns: tuple = ()

    def col(self, field: str) -> str:
        return dict(self.columns).get(field, field)

    def to_dict(self) -> dict:
        return {"format": self.format, "columns": dict(self.columns)}


def parse_layout(fmt: Any, columns: Any, at: str, base: Layout | None = None) -> tuple[Layout, list[str]]:
    """A format and a column mapping as written (None: take base's) -> Layout, errors."""
    base = base or Layout()
    errors = []
    if fmt is not None and fmt not in FORMATS:
        errors.append(f"{at}format: must be one of {list(FORMATS)}, got {fmt!r}")
    cols = dict(base.columns)
    if columns is not None:
        if not isinstance(columns, dict):
            errors.append(f"{at}columns: must map our field names to yours, e.g. {{messages: dialog}}, got {columns!r}")
        else:
            bad = sorted(k for k in columns if k not in FIELDS)
            if bad:
                errors.append(f"{at}columns: unknown field(s) {bad} (known: {', '.join(FIELDS)})")
            bad_v = sorted(k for k, v in columns.items() if not isinstance(v, str) or not v)
            if bad_v:
                errors.append(f"{at}columns: {bad_v} must name a field of your records (a string)")
            cols.update({k: v for k, v in columns.items() if isinstance(v, str)})
    return Layout(fmt if fmt in FORMATS else base.format, tuple(sorted(cols.items()))), errors


@dataclass(frozen=True)
class SourceSpec:
    """One entry of data.train as the user wrote it."""
    path: str
    weight: float = 1.0
    name: str = ""
    layout: Layout = Layout()

    @property
    def label(self) -> str:
        return self.name or self.path


# user:password@ in any URL, a bare user@ in http(s) (a token; Azure's container@account is not one),
# or a ?key=value query (a presigned URL's signature; a version id is not read either). A glob's ? has no =.
URL_SECRET = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/?#@]*:[^/?#@]*@|https?://[^/?#]*@"
                        r"|[A-Za-z][A-Za-z0-9+.-]*://[^?]*\?[^/]*=)", re.IGNORECASE)


def url_secret_error(at: str, path: Any) -> str | None:
    """A URL that carries credentials (user:password@host) or a query (a presigned signature) would be
    written into config.json, the manifests and the logs: refused, with where credentials go instead."""
    if isinstance(path, str) and URL_SECRET.match(path):
        return (f"{at}: {path.split('://', 1)[0]}:// URL with credentials or a ?query; the recipe is written "
                "into the run folder, so give the bare URL and let the store's client find the credentials "
                "(for S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws; docs/operating.md). A "
                "query is not read (a presigned URL: download the file; an object's version: copy it to a key)")
    return None


def parse_train(value: Any, layout: Layout = Layout()) -> tuple[list[SourceSpec], list[str]]:
    """data.train (a string, or a list of strings / {path, weight, name, format, columns} mappings)
    -> specs, errors. `layout`: data.format and data.columns, which an entry's own override."""
    items = value if isinstance(value, list) else [value]
    specs, errors = [], []
    if not items:
        errors.append("data.train: the list of sources is empty")
    for i, it in enumerate(items):
        at = f"data.train[{i}]" if isinstance(value, list) else "data.train"
        if isinstance(it, str) and it:
            specs.append(SourceSpec(it, layout=layout))
            continue
        if not isinstance(it, dict) or not isinstance(it.get("path"), str) or not it["path"]:
            errors.append(f"{at}: must be a path or {{path: ..., weight: ..., name: ...}}, got {it!r}")
            continue
        unknown = set(it) - {"path", "weight", "name", "format", "columns"}
        w = it.get("weight", 1.0)
        own, errs = parse_layout(it.get("format"), it.get("columns"), f"{at}.", layout)
        errors += errs
        if unknown:
            errors.append(f"{at}: unknown key(s) {sorted(unknown)} (known: path, weight, name, format, columns)")
        elif isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < math.inf:
            errors.append(f"{at}: weight must be a finite number > 0, got {w!r}")
        elif not errs:
            specs.append(SourceSpec(it["path"], float(w), str(it.get("name") or ""), own))
    errors += [e for i, s in enumerate(specs)
               if (e := url_secret_error(f"data.train[{i}]" if isinstance(value, list) else "data.train", s.path))]
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        errors.append(f"data.train: sources listed twice: {dup} (give each a distinct name)")
    return specs, errors


def config_layout(data: Any) -> Layout:
    """data.format and data.columns of a DataConfig, or of the `data` mapping of a run's config.json."""
    get = data.get if isinstance(data, dict) else lambda k, d=None: getattr(data, k, d)
    return parse_layout(get("format", "auto"), get("columns", {}) or {}, "data.")[0]


TRACKERS = ("tensorboard", "wandb", "mlflow")


def tracker_names(report_to) -> list[str]:
    """output.report_to as written (a name, none, or a list) -> tracker names."""
    items = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [n for n in items if n != "none"]


def train_specs(data: Any) -> list[SourceSpec]:
    """The sources of data.train, of a DataConfig or of the `data` mapping of a run's config.json
    (already validated: the one parse every reader of data.train goes through)."""
    get = data.get if isinstance(data, dict) else lambda k, d=None: getattr(data, k, d)
    return parse_train(get("train"), config_layout(data))[0]
