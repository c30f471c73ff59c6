"""Records -> validated dialogues.

A *dialogue* is `Dialogue(dialogue_id, messages, where)` with
`messages = [{"role": "system"|"user"|"assistant"|"tool", "content": str}]`
and `where` a human-readable location ("data.jsonl line 12") used in errors.

Four layouts are accepted, detected per record from its fields (data.format=auto) or set per
source (data.format, or a data.train entry's format), under the field names of data.columns:
  openai             {"messages": [{"role": ..., "content": ...}, ...]}
  sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}
  alpaca             {"instruction": ..., "input": ... (optional), "output": ..., "system": ... (optional)}
  prompt_completion  {"prompt": str | messages, "completion": str | messages}

A bad record raises InvalidRecord with a short kind (the skip counter's
key); readers turn it into one DataError naming the record and the fix, or
count it under data.skip_invalid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from ..errors import InvalidRecord, record_error
from .sources import Layout, SourceSpec, Unit, default_id, read_unit, resolve, units_of

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


def normalise(record: Any, layout: Layout = Layout()) -> tuple[list[dict], Any]:
    """Record -> (messages, own id or None), read in the source's layout. Raises InvalidRecord."""
    if isinstance(record, InvalidRecord):
        raise record
    if not isinstance(record, dict):
        raise InvalidRecord("not_an_object", f"record is a {type(record).__name__}, not an object")
    c = layout.col
    fmt = record_format(record, layout)
    if fmt is None:
        raise InvalidRecord("unknown_layout", f"record has none of the fields of a known layout: "
                            f"{c('messages')!r} (OpenAI), {c('conversations')!r} (ShareGPT), {c('instruction')!r} "
                            f"+ {c('output')!r} (Alpaca), {c('prompt')!r} + {c('completion')!r}; name yours with "
                            "data.columns, or set data.format")
    if fmt == "openai":
        messages = _turns(_field(record, c("messages"), fmt), c("role"), c("content"), None)
    elif fmt == "sharegpt":
        messages = _turns(_field(record, c("conversations"), fmt), c("from"), c("value"), SHAREGPT_ROLES)
    elif fmt == "alpaca":
        messages = _alpaca(record, c)
    else:
        messages = (_side(_field(record, c("prompt"), fmt), "user", c)
                    + _side(_field(record, c("completion"), fmt), "assistant", c))
    for i, m in enumerate(messages):
        _check_text(m["content"], i, m["role"])
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidRecord("no_assistant_turn", "the conversation has no assistant message to train on")
    return messages, record.get(c("id"))


def record_format(record: dict, layout: Layout = Layout()) -> str | None:
    """The source's format, or with data.format=auto the one the record's fields show (None: none)."""
    if layout.format != "auto":
        return layout.format
    c = layout.col
    if c("messages") in record:
        return "openai"
    if c("conversations") in record:
        return "sharegpt"
    if c("instruction") in record and c("output") in record:
        return "alpaca"
    if c("prompt") in record and c("completion") in record:
        return "prompt_completion"
    return None


def _field(record: dict, name: str, fmt: str) -> Any:
    if name not in record:
        raise InvalidRecord("missing_field", f"record has no {name!r} field (data.format={fmt}; map another name "
                            "with data.columns)")
    return record[name]


def _turns(raw: Any, role_key: str, text_key: str, role_map: dict | None) -> list[dict]:
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
    return messages


def _text(record: dict, name: str, optional: bool = False) -> str:
    v = record.get(name) if optional else _field(record, name, "alpaca")
    if v is None and optional:
        return ""
    if not isinstance(v, str):
        raise InvalidRecord("non_string_content", f"field {name!r} is {type(v).__name__}, not a string")
    return v


def _alpaca(record: dict, c) -> list[dict]:
    """instruction (+ a blank line and input, when there is one) -> user; output -> assistant;
    system, when there is one, first."""
    system, instruction = _text(record, c("system"), True), _text(record, c("instruction"))
    extra, output = _text(record, c("input"), True), _text(record, c("output"))
    user = instruction + ("\n\n" + extra if extra else "")
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _side(value: Any, role: str, c) -> list[dict]:
    """A prompt or completion: a string (one message of `role`) or a list of messages (TRL's
    conversational prompt-completion)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _turns(value, c("role"), c("content"), None)


def to_dialogue(unit: Unit, where: str, record: Any) -> Dialogue:
    """Validate one record read from a unit. Raises InvalidRecord."""
    messages, own_id = normalise(record, unit.layout)
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
