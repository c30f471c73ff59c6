"""Records -> validated dialogues.

A *dialogue* is `Dialogue(dialogue_id, messages, where, tools)` with
`messages = [{"role": "system"|"user"|"assistant"|"tool", "content": str}]`
and `where` a human-readable location ("data.jsonl line 12") used in errors.
Tool use, as transformers' chat templates take it: an assistant message may carry
`tool_calls` ([{"type": "function", "function": {"name": str, "arguments": dict}, "id": ...}];
its content may then be empty), a tool message keeps its `tool_call_id` and `name`, and the
record's `tools` list (JSON schemas) becomes `Dialogue.tools`, passed to the template. The keys
exist only where the record has them: templates test for them (`'tool_calls' in message`).

Per-message control (names mappable with data.columns): an assistant message may carry `train`
(false: context only, never trained, never in the statistics) and `weight` (a number >= 0 that
multiplies the turn's loss weight; 0 is context only); a record may carry `weight` too, which
multiplies every turn's. An assistant message's `reasoning_content` goes to the chat template,
which renders it or not (Qwen3 does for the replies after the last user message); it trains with
the reply unless data.train_reasoning=false. They become `Dialogue.weights` (one per assistant
message) and stay off the messages, so a plain dialogue stays plain.

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

import json
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator

from ..errors import InvalidRecord, record_error
from .manifest import manifest_source
from ..config.parse import Layout, SourceSpec
from .sources import Unit, default_id, read_unit, resolve, units_of

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "tool": "tool", "function": "tool", "function_call": "assistant",
    "observation": "tool",
}
TOOL_KEYS = ("tool_call_id", "name")  # kept on tool messages where present


@dataclass
class Dialogue:
    dialogue_id: str
    messages: list[dict]
    where: str
    tools: list | None = None
    weights: tuple[float, ...] | None = None  # per assistant message: its data weight (0: context only)

    @cached_property
    def plain(self) -> bool:
        """Only {role, content} messages and no tools: the template's layout is the same for
        every dialogue of these roles (render.py caches it)."""
        return not self.tools and all(len(m) == 2 for m in self.messages)


def _check_text(text: str, i: int, role: str) -> None:
    _check_strings(text, f"message {i} ({role})")


def _check_strings(value: Any, at: str) -> None:
    """Every string in a record's value (ids, names, tool calls and schemas, not only contents) must
    be text: valid JSON can hold a lone surrogate ("\udc31") that no tokenizer, Arrow column or
    UTF-8 file takes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRecord("bad_text", f"{at} holds a lone surrogate {value[e.start]!r} "
                                f"at character {e.start}") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, f"{at}: a key")
            _check_strings(v, at if k == "content" else f"{at} {k}")
    elif isinstance(value, list):
        for j, v in enumerate(value):
            _check_strings(v, f"{at}[{j}]")


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
        messages = _turns(_field(record, c("messages"), fmt), c("role"), c("content"), None, c("tool_calls"), c)
    elif fmt == "sharegpt":
        messages = _turns(_field(record, c("conversations"), fmt), c("from"), c("value"), SHAREGPT_ROLES, None, c)
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


def _turns(raw: Any, role_key: str, text_key: str, role_map: dict | None, calls_key: str | None,
           col=lambda f: f) -> list[dict]:
    """A list of messages -> normalised messages. calls_key: where OpenAI-style records keep an
    assistant's tool calls; ShareGPT (calls_key None) writes a call as a `function_call` turn
    whose value is the call's JSON. col names the per-message controls (module docstring); an
    assistant message's data weight rides under WEIGHT until to_dialogue takes it off."""
    if not isinstance(raw, list) or not raw:
        raise InvalidRecord("empty_conversation", "the conversation is empty")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise InvalidRecord("bad_message", f"message {i} is a {type(m).__name__}, not an object")
        raw_role = m.get(role_key)
        role = role_map.get(raw_role) if role_map is not None and isinstance(raw_role, str) else raw_role
        if role not in ROLES:
            raise InvalidRecord("unknown_role", f"message {i} has unknown role {m.get(role_key)!r} "
                                f"(expected one of {sorted(role_map) if role_map else list(ROLES)})")
        content = m.get(text_key)
        calls = m.get(calls_key) if calls_key else None
        if role_map is not None and raw_role == "function_call":
            calls, content = [_sharegpt_call(content, i)], ""
        if calls is not None and role == "assistant":
            msg = {"role": role, "content": "" if content is None else content, "tool_calls": _tool_calls(calls, i)}
        else:
            msg = {"role": role, "content": content}
        if not isinstance(msg["content"], str):
            raise InvalidRecord("non_string_content",
                                f"message {i} ({role}) has {text_key!r} of type {type(content).__name__}, not a string")
        if role == "tool":
            msg.update({k: m[k] for k in TOOL_KEYS if isinstance(m.get(k), str)})
        weight = _message_weight(m, i, role, col)
        if role == "assistant":
            reasoning = m.get(col("reasoning_content"))
            if reasoning is not None and not isinstance(reasoning, str):
                raise InvalidRecord("non_string_content", f"message {i} (assistant) has reasoning_content of type "
                                    f"{type(reasoning).__name__}, not a string")
            if reasoning:
                msg["reasoning_content"] = reasoning
            if weight is not None:
                msg[WEIGHT] = weight
        messages.append(msg)
    return messages


WEIGHT = "\ue000weight"  # a message's data weight between _turns and to_dialogue (no record key can be it)


def _message_weight(m: dict, i: int, role: str, col) -> float | None:
    """A message's `train` flag and `weight`, as one weight (None: neither given). Only assistant
    messages train: another message may say it is not trained, never that it is."""
    flag, w = m.get(col("train")), m.get(col("weight"))
    if flag is None and w is None:
        return None
    if flag is not None and not isinstance(flag, bool):
        raise InvalidRecord("bad_weight", f"message {i} ({role}) has train={flag!r}; expected true or false")
    weight = (1.0 if flag is None or flag else 0.0) * (1.0 if w is None else _weight(w, f"message {i} ({role})"))
    if role != "assistant" and weight > 0:
        raise InvalidRecord("bad_weight", f"message {i} ({role}) asks to be trained (train/weight), but only "
                            "assistant messages train; give it train: false or weight: 0, or leave the keys out")
    return weight


MAX_WEIGHT = 1000.0  # a data weight (and a record's times a message's): past this, a step's loss would be
                    # swamped by one turn (a weight of 1e30 made a gradient norm of 2.5e29)


def _weight(w: Any, at: str) -> float:
    ok = not isinstance(w, bool) and isinstance(w, (int, float))
    try:
        x = float(w) if ok else math.nan  # an integer of 400 digits does not fit a float
    except OverflowError:
        x = math.inf
    if not (math.isfinite(x) and 0 <= x <= MAX_WEIGHT):
        shown = repr(w) if len(repr(w)) <= 40 else repr(w)[:37] + "..."
        raise InvalidRecord("bad_weight", f"{at} has weight {shown}; expected a finite number in [0, {MAX_WEIGHT:g}] "
                            "(0: context only, never trained)")
    return x


def _tool_calls(calls: Any, i: int) -> list[dict]:
    """OpenAI-style tool calls, checked; arguments given as a JSON string become the object
    (transformers' documented form, which every template can render)."""
    if not isinstance(calls, list) or not calls:
        raise InvalidRecord("bad_tool_call", f"message {i} has tool_calls that are not a non-empty list")
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRecord("bad_tool_call", f"message {i} tool call {k} has no function name "
                                "(expected {\"type\": \"function\", \"function\": {\"name\": ..., \"arguments\": {...}}})")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise InvalidRecord("bad_tool_call", f"message {i} tool call {k} ({fn['name']}) has arguments "
                                    "that are not JSON") from None
        if not isinstance(args, dict):
            raise InvalidRecord("bad_tool_call", f"message {i} tool call {k} ({fn['name']}) has arguments of type "
                                f"{type(args).__name__}, not an object")
        call_out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and isinstance(call.get("id"), str):
            call_out["id"] = call["id"]
        out.append(call_out)
    return out


def _sharegpt_call(value: Any, i: int) -> dict:
    """A ShareGPT `function_call` turn's value: {"name": ..., "arguments": ...} as JSON."""
    try:
        call = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError:
        call = None
    if not isinstance(call, dict):
        raise InvalidRecord("bad_tool_call", f"message {i} (function_call) is not a JSON object "
                            "{\"name\": ..., \"arguments\": {...}}")
    return call


def record_tools(record: dict, layout: Layout = Layout()) -> list | None:
    """The record's `tools` (a list of JSON schemas, or that list as a JSON string, as ShareGPT
    files keep it), or None. Raises InvalidRecord."""
    tools = record.get(layout.col("tools"))
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise InvalidRecord("bad_tools", "the record's tools field is a string that is not JSON") from None
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise InvalidRecord("bad_tools", "the record's tools field must be a list of JSON schemas (objects)")
    return tools


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
    return _turns(value, c("role"), c("content"), None, c("tool_calls"), c)


def to_dialogue(unit: Unit, where: str, record: Any) -> Dialogue:
    """Validate one record read from a unit. Raises InvalidRecord."""
    messages, _ = normalise(record, unit.layout)
    did = dialogue_id(unit, where, record)
    tools = record_tools(record, unit.layout)
    _check_strings(did, "id")
    for i, m in enumerate(messages):
        _check_strings(m, f"message {i} ({m['role']})")
    _check_strings(tools, "tools")
    return Dialogue(did, messages, f"{unit.path} {where}", tools, _weights(record, messages, unit.layout))


def dialogue_id(unit: Unit, where: str, record: Any) -> str | None:
    """The id to_dialogue gives a record, read without validating the rest (None: not an object)."""
    if not isinstance(record, dict):
        return None
    own = record.get(unit.layout.col("id"))
    return str(own) if own is not None else default_id(unit, where)


def _weights(record: dict, messages: list[dict], layout: Layout) -> tuple[float, ...] | None:
    """Each assistant message's data weight (its own times the record's), taken off the messages;
    None where the record gives none."""
    own = record.get(layout.col("weight"))
    scale = 1.0 if own is None else _weight(own, "the record")
    per = [m.pop(WEIGHT, 1.0) for m in messages if m["role"] == "assistant"]
    if own is None and all(w == 1.0 for w in per):
        return None
    if scale * max(per, default=0.0) > MAX_WEIGHT:
        raise InvalidRecord("bad_weight", f"the record's weight {scale:g} times a message's {max(per):g} is over "
                            f"{MAX_WEIGHT:g}; scale the weights down")
    return tuple(w * scale for w in per)


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


def raw_source(spec: SourceSpec):
    """The source whose records a spec reads (a prepared folder: the one it was prepared from)."""
    src = resolve(spec)
    return resolve(manifest_source(src.files[0])) if src.kind == "prepared" else src


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
    for unit in units_of(raw_source(spec if isinstance(spec, SourceSpec) else SourceSpec(spec))):
        yield from unit_dialogues(unit, skip_invalid, skipped)
