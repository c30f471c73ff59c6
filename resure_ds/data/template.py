"""The chat template as the span finders use it: one small object holding the tokenizer, its special
tokens, the template called directly where that is exact, and the form it takes tool calls in; plus
the text helpers every span path shares (placeholders, where two renderings differ, where a turn
ends, whether a span shows its message). The paths that find the trained spans build on it:
layout.py (one rendering, read with the template's layout), prefix.py (the defining computation,
every prefix rendered), located.py (one probe rendering per reply), toolcalls.py (the checks of
tool-call dialogues); render.py puts them together.
"""
from __future__ import annotations

import json

from ..errors import DataError, InvalidRecord

PLACEHOLDER = "\ue000{}\ue001"  # private-use code points: never in real text, never trimmed
CALL_FORMS = [(False, False), (True, False), (False, True), (True, True)]  # (args as text, null content)


class Template:
    def __init__(self, tokenizer):
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("the tokenizer must be a fast (Rust) tokenizer: turn spans need exact token pieces")
        if not tokenizer.chat_template:
            raise DataError("the tokenizer has no chat template; set model.chat_template to a Jinja template")
        self.tok = tokenizer
        # Longest first, so '<|im_end|>' wins over a shorter special token it contains.
        specials = set(tokenizer.all_special_tokens) | {str(t) for t in tokenizer.get_added_vocab()}
        self.specials = sorted((s for s in specials if s), key=len, reverse=True)
        self.direct = self._direct_renderer()
        self.call_form: tuple[bool, bool] | None = None  # (arguments as text, empty reply as null)

    def _direct_renderer(self):
        """The compiled template called directly, as apply_chat_template calls it for plain
        {role, content} messages, minus its per-call copies of every message (a third of the
        cost of a rendering). Used only where it gives apply_chat_template's text on probe
        dialogues; otherwise, or on a transformers without it, apply_chat_template itself."""
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.tok.get_chat_template())
            extra = dict(self.tok.special_tokens_map)

            def render(messages, gen):
                return compiled.render(messages=messages, tools=None, documents=None, add_generation_prompt=gen,
                                       **extra)

            probes = [[{"role": "user", "content": " hi "}, {"role": "assistant", "content": "Hello!\n"}],
                      [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                       {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]]
            for m in probes:
                for gen in (False, True):
                    if render(m, gen) != self.tok.apply_chat_template(m, tokenize=False, add_generation_prompt=gen):
                        return None
            return render
        except Exception:  # noqa: BLE001 - any failure here just means: use the public API
            return None

    def render(self, messages, gen: bool, tools: list | None = None, plain: bool = True) -> str:
        """The template's text. plain: {role, content} messages and no tools (the direct
        renderer was checked on those); anything else goes through apply_chat_template, with
        tool-call arguments in the form this template takes (an object, or its JSON text: decided
        once, by the first dialogue with a call that renders only one way)."""
        try:
            if self.direct is not None and plain and not tools:
                return self.direct(messages, gen)
            if any(m.get("tool_calls") for m in messages):
                return self._with_calls(messages, gen, tools)
            return self.tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja raises for roles or orders the template refuses
            raise InvalidRecord("template_refused", f"the chat template refused this dialogue ({e})") from None

    def _with_calls(self, messages: list[dict], gen: bool, tools: list | None) -> str:
        """Render messages with tool calls in the form this template consumes: arguments as an object
        or as JSON text (DeepSeek's templates concatenate them as text), an empty reply as "" or
        null (DeepSeek R1's writes the calls only when the content is null). Decided once, by the
        first dialogue that renders with every call's function name in its text under some form;
        where no form shows them, the first that renders (the span check then refuses it)."""
        forms = [self.call_form] if self.call_form is not None else CALL_FORMS
        first, error = None, None
        for form in forms:
            try:
                text = self.tok.apply_chat_template(call_form(messages, form), tools=tools, tokenize=False,
                                                    add_generation_prompt=gen)
            except Exception as e:  # noqa: BLE001 - the next form may render
                error = error or e
                continue
            names = [c.get("function", c).get("name", "") for m in messages for c in m.get("tool_calls", ())]
            if self.call_form is not None or all(n in text for n in names):
                self.call_form = form
                return text
            first = first if first is not None else text
        if first is None:
            raise error
        return first

    def end_of_turn(self, tail: str) -> int:
        """Characters of `tail` (text after an assistant content) that are trained: up to and
        including the first special token, else the non-space text."""
        hits = [(tail.find(s), s) for s in self.specials if s in tail]
        if hits:
            pos, s = min(hits, key=lambda h: (h[0], -len(h[1])))
            return pos + len(s)
        return len(tail.rstrip())

    def end_of_turn_after(self, text: str, at: int) -> int:
        """Characters after `at` that are trained as the end of turn: the first special token when
        only white space comes before it, else none."""
        rest = text[at:]
        lead = len(rest) - len(rest.lstrip())
        for s in self.specials:  # longest first
            if rest.startswith(s, lead):
                return lead + len(s)
        return 0

    def snap(self, text: str, s: int, cut: int) -> int:
        """cut, moved back to the start of a special token it would split."""
        for sp in self.specials:
            at = text.rfind(sp, s, cut + len(sp) - 1)
            if at >= 0 and at < cut < at + len(sp):
                cut = at
        return cut


def placeholders(roles: tuple) -> list[dict]:
    return [{"role": r, "content": PLACEHOLDER.format(i)} for i, r in enumerate(roles)]


def call_form(messages: list[dict], form: tuple[bool, bool]) -> list[dict]:
    """Messages with their tool calls in a form: arguments as JSON text (the OpenAI wire form)
    instead of the object, and an empty reply as null."""
    as_text, null = form

    def call(c):
        fn = c.get("function", c)
        args = fn.get("arguments")
        fn = {**fn, "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}
        return {**c, "function": fn} if "function" in c else fn

    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [call(c) for c in m["tool_calls"]] if as_text else m["tool_calls"],
                 "content": None if null and not m["content"].strip() else m["content"]}
        out.append(m)
    return out


def _longest(hi: int, same) -> int:
    """The largest m in [0, hi] with same(m), for a same() that holds up to some m and not past it
    (binary search: each test is one slice comparison, done in C)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if same(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_prefix(a: str, b: str) -> int:
    return _longest(min(len(a), len(b)), lambda m: a[:m] == b[:m])


def differing(full: str, other: str) -> tuple[int, int]:
    """The span of `full` that differs from `other` (their common prefix and suffix cut away)."""
    a = common_prefix(full, other)
    return a, len(full) - _common_suffix(full, other, min(len(full), len(other)) - a)


def _common_suffix(a: str, b: str, limit: int) -> int:
    """Length of the longest common suffix, at most `limit`."""
    return _longest(limit, lambda m: a[len(a) - m:] == b[len(b) - m:])


def written(value: str, text: str) -> bool:
    """value is in text as written, or JSON-escaped, or (a boolean) in Python's spelling."""
    return any(v in text for v in (value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1],
                                   value.capitalize()))


def shows(m: dict, span: str) -> bool:
    """The located text holds the message: its content (or what a reasoning template keeps of
    it, the reply after the last `</think>`); a tool-call message with no content, some text;
    an empty reply, nothing (only its end of turn is trained, as on the prefix path)."""
    content = m["content"].strip()
    if "</think>" in content and content.rsplit("</think>", 1)[1].strip() in span:
        return True
    if not content:
        return bool(span.strip()) if m.get("tool_calls") else not span.strip()
    return content in span
