"""Records -> validated dialogues.

A *dialogue* is `Dialogue(dialogue_id, messages, where)` with
`messages = [{"role": "system"|"user"|"assistant"|"tool", "content": str}]`
and `where` a human-readable location ("data.jsonl line 12") used in errors.

Two layouts are accepted per record:
  OpenAI    {"messages": [{"role": ..., "content": ...}, ...]}
  ShareGPT  {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}

A bad record raises InvalidRecord with a short kind (the skip counter's
key); readers turn it into one DataError naming the record and the fix, or
count it under data.skip_invalid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from ..errors import InvalidRecord, record_error
from .sources import SourceSpec, Unit, default_id, read_unit, resolve, units_of

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "tool": "tool", "function": "tool", "function_call": "assistant",
    "observation": "tool",
}


@dataclass
class Dialogue:
    dialogue_id: str
    messages: list[dict]
    where: str


def _check_text(text: str, i: int, role: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # valid JSON ("\udc31") but not text any tokenizer can take
        raise InvalidRecord("bad_text", f"message {i} ({role}) holds a lone surrogate {text[e.start]!r} "
                            f"at character {e.start}") from None


def normalise(record: Any) -> tuple[list[dict], Any]:
    """Record -> (messages, own id or None). Raises InvalidRecord."""
    if isinstance(record, InvalidRecord):
        raise record
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
        _check_text(content, i, role)
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidRecord("no_assistant_turn", "the conversation has no assistant message to train on")
    return messages, record.get("id")


def to_dialogue(unit: Unit, where: str, record: Any) -> Dialogue:
    """Validate one record read from a unit. Raises InvalidRecord."""
    messages, own_id = normalise(record)
    did = str(own_id) if own_id is not None else default_id(unit, where)
    return Dialogue(did, messages, f"{unit.path} {where}")


class SkipCounter(dict):
    """kind -> count of records skipped under skip_invalid; reported, never silent."""

    def add(self, kind: str, n: int = 1) -> None:
        self[kind] = self.get(kind, 0) + n

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.items())) or "none"


def unit_dialogues(unit: Unit, skip_invalid: bool, skipped: SkipCounter,
                   records: Iterator[tuple[str, Any]] | None = None) -> Iterator[Dialogue]:
    """Validated dialogues of one unit (or of `records` read elsewhere, located in `unit`); bad
    records raise a located DataError or are counted."""
    for where, rec in read_unit(unit) if records is None else records:
        try:
            yield to_dialogue(unit, where, rec)
        except InvalidRecord as bad:
            if not skip_invalid:
                raise record_error(f"{unit.path} {where}", bad) from None
            skipped.add(bad.kind)


def _in_memory(ds: Any) -> Iterator[tuple[str, Any]]:
    for i, rec in enumerate(ds):
        yield f"row {i}", rec


def read_dialogues(spec: Any, skip_invalid: bool = False,
                   skipped: SkipCounter | None = None) -> Iterator[Dialogue]:
    """Stream validated dialogues of one source (a path as data.train takes it, or an in-memory
    `datasets.Dataset`). Bad records raise DataError naming file, record and fix; with
    skip_invalid=True they are counted in `skipped` by kind instead."""
    skipped = SkipCounter() if skipped is None else skipped
    if not isinstance(spec, (str, SourceSpec)):
        name = str(getattr(getattr(spec, "info", None), "dataset_name", None) or type(spec).__name__)
        yield from unit_dialogues(Unit("memory", name, 0, 0, 0), skip_invalid, skipped, _in_memory(spec))
        return
    src = resolve(spec if isinstance(spec, SourceSpec) else SourceSpec(spec))
    if src.kind == "prepared":
        from .shards import manifest_source

        src = resolve(manifest_source(src.files[0]))
    for unit in units_of(src):
        yield from unit_dialogues(unit, skip_invalid, skipped)
