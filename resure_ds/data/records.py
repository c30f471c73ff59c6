"""Readers: files and datasets -> normalised dialogues.

A *dialogue* is `Dialogue(dialogue_id, messages, where)` with
`messages = [{"role": "system"|"user"|"assistant"|"tool", "content": str}]`
and `where` a human-readable location ("data.jsonl line 12") used in errors.

Two layouts are accepted per record:
  OpenAI    {"messages": [{"role": ..., "content": ...}, ...]}
  ShareGPT  {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}

Every reader streams: nothing holds a whole corpus in memory except the
plain `.json` reader (a JSON array has to be parsed whole; use JSONL or
Parquet for large corpora).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "tool": "tool", "function": "tool", "function_call": "assistant",
    "observation": "tool",
}


class DataError(ValueError):
    """A user-fixable problem with input data; the message names file, record and fix."""


class InvalidRecord(Exception):
    """One bad record: `kind` is a short counter key, `detail` says what is wrong."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


@dataclass
class Dialogue:
    dialogue_id: str
    messages: list[dict]
    where: str


def normalise(record: Any) -> tuple[list[dict], Any]:
    """Record -> (messages, own id or None). Raises InvalidRecord."""
    if not isinstance(record, dict):
        raise InvalidRecord("not_an_object", f"record is a {type(record).__name__}, not an object")
    if "messages" in record:
        raw, role_key, text_key, role_map = record["messages"], "role", "content", None
    elif "conversations" in record:
        raw, role_key, text_key, role_map = record["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        raise InvalidRecord("unknown_layout", "record has neither a 'messages' nor a 'conversations' list")
    if not isinstance(raw, list) or not raw:
        raise InvalidRecord("empty_conversation", "the conversation is empty")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise InvalidRecord("bad_message", f"message {i} is a {type(m).__name__}, not an object")
        role = m.get(role_key)
        role = role_map.get(role) if role_map is not None and isinstance(role, str) else role
        if role not in ROLES:
            raise InvalidRecord("unknown_role", f"message {i} has unknown role {m.get(role_key)!r} "
                                f"(expected one of {sorted(role_map) if role_map else list(ROLES)})")
        content = m.get(text_key)
        if not isinstance(content, str):
            raise InvalidRecord("non_string_content",
                                f"message {i} ({role}) has {text_key!r} of type {type(content).__name__}, not a string")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidRecord("no_assistant_turn", "the conversation has no assistant message to train on")
    return messages, record.get("id")


def _jsonl(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {lineno}", InvalidRecord("malformed_json", f"malformed JSON ({e.msg} at column {e.colno})")


def _json(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}. "
                            "Fix the file, or store one record per line as .jsonl") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json file must hold a list of records (or {{'data': [...]}})")
    for i, rec in enumerate(data):
        yield f"record {i}", rec


def _parquet(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            yield f"row {row}", rec
            row += 1


def _hf_dataset(ds: Any, name: str) -> Iterator[tuple[str, Any]]:
    for i, rec in enumerate(ds):
        yield f"row {i}", rec


def _chitchat(_: str) -> Iterator[tuple[str, Any]]:
    from .chitchat import chitchat_records

    for key, rec in chitchat_records():
        yield f"conversation {key}", rec


def _source(spec: Any) -> tuple[str, Iterator[tuple[str, Any]]]:
    """spec: path, 'chitchat', or a datasets.Dataset -> (name, (where, record) iterator)."""
    if not isinstance(spec, (str, os.PathLike)):
        name = getattr(spec, "info", None) and spec.info.dataset_name or type(spec).__name__
        return str(name), _hf_dataset(spec, str(name))
    spec = str(spec)
    if spec == "chitchat":
        return "chitchat-dataset", _chitchat(spec)
    if os.path.isdir(spec):
        import datasets

        try:
            ds = datasets.load_from_disk(spec)
        except FileNotFoundError as e:
            raise DataError(f"{spec}: a folder must be a dataset saved with datasets' save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{spec}: holds splits {list(ds)}; point data at one split's folder")
        return spec, _hf_dataset(ds, spec)
    if not os.path.exists(spec):
        raise DataError(f"{spec}: no such file. Set data.train to a .jsonl, .json or .parquet file, "
                        "a saved datasets folder, or 'chitchat' for the embedded corpus")
    readers = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet}
    ext = os.path.splitext(spec)[1].lower()
    if ext not in readers:
        raise DataError(f"{spec}: unknown file type {ext!r}; use .jsonl, .json or .parquet")
    return spec, readers[ext](spec)


class SkipCounter(dict):
    """kind -> count of records skipped under skip_invalid; reported, never silent."""

    def add(self, kind: str) -> None:
        self[kind] = self.get(kind, 0) + 1

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.items())) or "none"


def read_dialogues(spec: Any, skip_invalid: bool = False,
                   skipped: SkipCounter | None = None) -> Iterator[Dialogue]:
    """Stream validated dialogues from one source.

    Bad records raise DataError naming file, record and fix; with
    skip_invalid=True they are counted in `skipped` by kind instead.
    """
    name, it = _source(spec)
    base = os.path.basename(name) if isinstance(spec, (str, os.PathLike)) else name
    for where, rec in it:
        try:
            if isinstance(rec, InvalidRecord):
                raise rec
            messages, own_id = normalise(rec)
        except InvalidRecord as bad:
            if skip_invalid:
                if skipped is not None:
                    skipped.add(bad.kind)
                continue
            raise DataError(f"{name} {where}: {bad.detail}. Fix the record, or set "
                            f"data.skip_invalid=true to skip and count such records") from None
        did = str(own_id) if own_id is not None else f"{base}:{where.split()[-1]}"
        yield Dialogue(did, messages, f"{name} {where}")
