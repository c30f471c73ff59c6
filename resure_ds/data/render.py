"""Chat-template rendering: dialogue -> (input_ids, turn_ids, partial).

Trained tokens are each assistant message's content plus the template's
end-of-turn token; every other token has turn id -1 (label -100). The turn
id is the 0-based index of the assistant message in the dialogue.

Where the spans are. The definition is the prefix one: for assistant message
j, render the dialogue up to j with the generation prompt (P_j) and up to and
including j (Q_j); the template must be prefix-stable (P_j a prefix of Q_j,
Q_j a prefix of the whole rendering); the trained span is the content after
P_j plus the first special token after it (the end-of-turn token).
Rendering every prefix costs 2 template calls per assistant turn, so a
dialogue of n turns costs O(n^2) characters. The fast path gets the same
spans from ONE rendering of the real dialogue: the template's own text
around each message (its *layout*) is found once per role sequence by
rendering placeholder contents, and cached; the real rendering is then
checked to be exactly layout text + (content or content.strip()) + layout
text + ..., which also gives every content's position. A template whose text
depends on the contents fails that check and takes the prefix path. A
dialogue much longer than max_length tokens renders only its first messages
(through an assistant message, so the text is that message's Q_j, a prefix of
the whole rendering), and all of them if the cut does not fall inside.

Templates that are not prefix-stable (Qwen3 renders `<think></think>` only after the last user
query; Mistral v0.3 moves the system message into the last user turn), and dialogues with tool
calls or tools, take the located path instead: ONE rendering of the whole dialogue (what the
model sees at inference for it), and for each assistant message j a probe rendering with that
message replaced by a placeholder. What differs between the two (their common prefix and suffix
cut away) is message j's own text there: its content, or its tool-call text as the template
writes it, and nothing of the template's own text around it. The span is that text plus the
end-of-turn token that follows it. Checked: the probe's differing text holds the placeholder,
the spans come in order, and the content (or, where the template keeps only the reply after a
`</think>`, that reply) is in its span; else the dialogue is refused (template_rewrites).

Tool calls (tool_calls, tool messages, a tools list) get a check no template can fool, on every
path: a calling turn's trained text must hold its call (function name and every argument value,
as the template writes them), no trained text may hold a tool message's output, a reply's must
hold its content. A template that writes the tool's response inside the model's turn (Gemma 4)
gets the turn cut where the response starts (sub-turn masking: the call trains, the response is
context). Arguments go to the template as an object or as JSON text and an empty reply as "" or
null, whichever form the template renders the calls with (decided once per template). A template
that refuses a placeholder in place of a call (gpt-oss: a tool message must follow its call)
locates that call by the prefix definition. What fails is refused with its cause
(template_drops_calls, template_drops_tools, template_tool_output), never trained.

Tokens: the rendering is tokenized piece by piece (untrained text, trained
span, untrained text, ...), exactly as at inference, where the prompt ends
with the generation prompt and the model produces the reply's tokens, so a
BPE merge across a span boundary can never blur which tokens are trained.
`render_many` tokenizes the pieces of many dialogues in one call of the Rust
tokenizer. Text past what max_length tokens can cover is never tokenized.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from . import IGNORE
from ..errors import DataError, InvalidRecord, record_error
from .records import Dialogue

RENDER_VERSION = 3  # part of the prepared-data cache key: bump when the rendered tokens would change
_PLACEHOLDER = "\ue000{}\ue001"  # private-use code points: never in real text, never trimmed
_LAYOUT_CACHE_SIZE = 4096
_UNBOUNDED = 2 ** 40  # max_length None: the whole dialogue (data.overflow split and drop)
_GUESS_CHARS_PER_TOKEN = 5  # English BPE averages about 4; later rounds fetch what a guess missed


@dataclass
class Example:
    dialogue_id: str
    input_ids: np.ndarray  # [n] int32
    turn_ids: np.ndarray   # [n] int32, -1 = untrained
    partial: np.ndarray    # [turns present] bool: cut by max_length
    weights: np.ndarray | None = None  # [assistant messages] float32: data weights (records.py); None: all 1

    @property
    def labels(self) -> np.ndarray:
        return np.where(self.turn_ids >= 0, self.input_ids, IGNORE).astype(np.int64)


@dataclass
class _Layout:
    glue: list[str]                 # text before content i (glue[n]: after the last content)
    tails: dict[int, str] | None    # assistant j -> text Q_j writes after its content; None: the
                                    # template is not prefix-stable for these roles (glue only)


_DROPPED = object()  # a dialogue skipped while re-rendering in full


class Renderer:
    def __init__(self, tokenizer, max_length: int | None, train_reasoning: bool = True):
        """max_length: tokens rendered (the rest of the dialogue is never tokenized); None: all.
        train_reasoning: an assistant message's reasoning_content, where the template renders it,
        is in its trained span (else context). `notes` counts what the template left out."""
        self.train_reasoning = train_reasoning
        self.notes: dict[str, int] = {}
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("the tokenizer must be a fast (Rust) tokenizer: turn spans need exact token pieces")
        if not tokenizer.chat_template:
            raise DataError("the tokenizer has no chat template; set model.chat_template to a Jinja template")
        self.tok = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.max_length = max_length or _UNBOUNDED
        # Longest first, so '<|im_end|>' wins over a shorter special token it contains.
        specials = set(tokenizer.all_special_tokens) | {str(t) for t in tokenizer.get_added_vocab()}
        self.specials = sorted((s for s in specials if s), key=len, reverse=True)
        # No token covers more characters than its vocabulary string (a byte-level BPE string has one
        # character per byte), so text beyond max_length * longest can never fall inside the cut.
        longest = max(max(len(s) for s in tokenizer.get_vocab()), max(map(len, self.specials), default=1))
        self.char_cap = self.max_length * longest
        self._layouts: dict[tuple, _Layout | None] = {}
        self._prefixes: dict[tuple, tuple[str, str] | None] = {}
        self._render = self._direct_renderer()
        self._call_form: tuple[bool, bool] | None = None  # (arguments as text, empty reply as null)

    # -- template ---------------------------------------------------------
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

    def _template(self, messages, gen: bool, tools: list | None = None, plain: bool = True) -> str:
        """The template's text. plain: {role, content} messages and no tools (the direct
        renderer was checked on those); anything else goes through apply_chat_template, with
        tool-call arguments in the form this template takes (an object, or its JSON text: decided
        once, by the first dialogue with a call that renders only one way)."""
        try:
            if self._render is not None and plain and not tools:
                return self._render(messages, gen)
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
        forms = [self._call_form] if self._call_form is not None else _CALL_FORMS
        first, error = None, None
        for form in forms:
            try:
                text = self.tok.apply_chat_template(_call_form(messages, form), tools=tools, tokenize=False,
                                                    add_generation_prompt=gen)
            except Exception as e:  # noqa: BLE001 - the next form may render
                error = error or e
                continue
            names = [c.get("function", c).get("name", "") for m in messages for c in m.get("tool_calls", ())]
            if self._call_form is not None or all(n in text for n in names):
                self._call_form = form
                return text
            first = first if first is not None else text
        if first is None:
            raise error
        return first

    def _end_of_turn(self, tail: str) -> int:
        """Characters of `tail` (text after an assistant content) that are trained: up to and
        including the first special token, else the non-space text."""
        hits = [(tail.find(s), s) for s in self.specials if s in tail]
        if hits:
            pos, s = min(hits, key=lambda h: (h[0], -len(h[1])))
            return pos + len(s)
        return len(tail.rstrip())

    def _placeholders(self, roles: tuple) -> list[dict]:
        return [{"role": r, "content": _PLACEHOLDER.format(i)} for i, r in enumerate(roles)]

    def _prefix_tail(self, roles: tuple) -> tuple[str, str] | None:
        """For roles ending in an assistant message j: (Q_j, the text Q_j writes after the content),
        rendered with placeholders and cached per prefix; None where P_j is not a prefix of Q_j."""
        if roles not in self._prefixes:
            msgs = self._placeholders(roles)
            p, q = self._template(msgs[:-1], True), self._template(msgs, False)
            at = q.find(msgs[-1]["content"])
            ok = q.startswith(p) and at >= len(p)
            self._prefixes[roles] = (q, q[at + len(msgs[-1]["content"]):]) if ok else None
        return self._prefixes[roles]

    def _layout(self, roles: tuple) -> _Layout | None:
        """The template's text around each message for this role sequence (cached), or None
        when placeholders do not show one. tails is None where the layout is not prefix-stable:
        its glue still reads spans off the whole dialogue's rendering (the located path's
        spans, got from one rendering instead of one per reply)."""
        if roles in self._layouts:
            return self._layouts[roles]
        if len(self._layouts) >= _LAYOUT_CACHE_SIZE:
            self._layouts.clear()
            self._prefixes.clear()
        msgs = self._placeholders(roles)
        layout = None
        try:
            full = self._template(msgs, False)
            glue, pos = [], 0
            for m in msgs:
                at = full.find(m["content"], pos)
                if at < 0 or full.count(m["content"]) != 1:
                    raise ValueError
                glue.append(full[pos:at])
                pos = at + len(m["content"])
            glue.append(full[pos:])
            tails = {}
            for j, r in enumerate(roles):
                if r == "assistant":
                    info = self._prefix_tail(roles[:j + 1])
                    if info is None or not full.startswith(info[0]):
                        tails = None
                        break
                    tails[j] = info[1]
            layout = _Layout(glue, tails)
        except (ValueError, InvalidRecord):
            layout = None
        self._layouts[roles] = layout
        return layout

    def _fast_spans(self, d: Dialogue, text: str, k: int) -> list[tuple[int, int]] | None:
        """Spans of the first k messages, read off `text` (the rendering of messages[:k]) with the
        layout of the whole dialogue; None where the text is not exactly that layout around the
        contents. k < all: messages[:k] ends with an assistant message, so `text` is its Q_j."""
        n = len(d.messages)
        layout = self._layout(tuple(m["role"] for m in d.messages))
        if layout is None or (layout.tails is None and k < n):
            return None
        spans, pos = [], 0
        for i in range(k):
            m = d.messages[i]
            if not text.startswith(layout.glue[i], pos):
                return None
            pos += len(layout.glue[i])
            nxt = layout.tails[i] if i == k - 1 < n - 1 else layout.glue[i + 1]  # (k < n: stable)
            for content in (m["content"], m["content"].strip()):
                end = pos + len(content)
                if text.startswith(content, pos) and text.startswith(nxt, end):
                    break
            else:
                return None
            if m["role"] == "assistant":
                if layout.tails is not None:
                    spans.append((pos, end + self._end_of_turn(layout.tails[i])))
                else:  # as the located path ends a span: the special token right after the reply
                    spans.append((pos, end + self._end_of_turn_after(text, end)))
            pos = end
        last = layout.tails[k - 1] if k < n else layout.glue[-1]
        return spans if pos + len(last) == len(text) else None

    def _head(self, d: Dialogue) -> int:
        """How many messages to render: through the first assistant message by which the contents
        alone pass a guess of the characters max_length tokens cover; all when none does."""
        budget, chars = _GUESS_CHARS_PER_TOKEN * self.max_length, 0
        for i, m in enumerate(d.messages):
            chars += len(m["content"].strip())
            if chars > budget and m["role"] == "assistant":
                return i + 1
        return len(d.messages)

    def prefix_spans(self, d: Dialogue, full: str) -> Iterator[tuple[int, int]]:
        """The defining computation: render every prefix. Raises InvalidRecord where the template
        is not prefix-stable for this dialogue or rewrites an assistant message (a template may do
        that only for some shapes, e.g. one that injects a default system prompt before a dialogue
        that opens with an assistant message): a located error, or a counted skip."""
        for j, m in enumerate(d.messages):
            if m["role"] != "assistant":
                continue
            p = self._template(d.messages[:j], True, d.tools, d.plain)
            q = self._template(d.messages[:j + 1], False, d.tools, d.plain)
            if not (q.startswith(p) and full.startswith(q)):
                raise InvalidRecord("template_unstable", f"the chat template is not prefix-stable at message {j} "
                                    "of this dialogue, so its assistant spans cannot be located (does it open "
                                    "with an assistant message?); or use a prefix-stable model.chat_template")
            seg = q[len(p):]
            if m.get("tool_calls"):  # the call's text as the template writes it, through the end of turn
                yield len(p) + len(seg) - len(seg.lstrip()), len(p) + len(seg.rstrip())
                continue
            content = m["content"]
            at = seg.find(content)
            if at < 0:
                content = content.strip()
                at = seg.find(content)
            if at < 0:
                raise InvalidRecord("template_rewrites", f"the chat template rewrites assistant message {j}; "
                                    "its text is not in the rendering")
            c_end, start = at + len(content), at
            thought = m.get("reasoning_content", "").strip() if self.train_reasoning else ""
            if thought and 0 <= seg.find(thought) < at:  # the reasoning the template writes before the reply
                start = seg.find(thought)
            yield len(p) + start, len(p) + c_end + self._end_of_turn(seg[c_end:])

    def located_spans(self, d: Dialogue, full: str) -> list[tuple[int, int]]:
        """Spans read off `full` (the rendering of the whole dialogue) by one probe rendering per
        assistant message (module docstring). Raises InvalidRecord where they cannot be located."""
        spans, floor = [], 0
        for j, m in enumerate(d.messages):
            if m["role"] != "assistant":
                continue
            mark = _PLACEHOLDER.format(j)
            keep = {} if self.train_reasoning or "reasoning_content" not in m else {
                "reasoning_content": m["reasoning_content"]}  # the same in both: not in the span
            probe = [*d.messages[:j], {"role": "assistant", "content": mark, **keep}, *d.messages[j + 1:]]
            try:
                other = self._template(probe, False, d.tools, plain=d.plain)
            except InvalidRecord:
                local = self._local_span(d, j, full) if m.get("tool_calls") else None
                if local is not None and local[0] >= floor:  # harmony: a tool message needs its call
                    spans.append(local)
                    continue
                raise InvalidRecord("template_rewrites", f"the chat template renders this dialogue but refuses it with "
                                    f"assistant message {j} as plain text (a template that checks role order with "
                                    "tool calls left out), so that message cannot be located; set "
                                    "model.chat_template to one that renders it") from None
            s, e = _differing(full, other)
            b = len(full) - e
            calling = bool(m.get("tool_calls"))  # its span may run over a tool's output: cut and ordered later
            if mark not in other[s:len(other) - b] or (s < floor and not calling) or not _shows(m, full[s:e]):
                raise InvalidRecord("template_rewrites", f"assistant message {j} could not be located in the rendering "
                                    "of this dialogue: the chat template rewrites it, or changes other messages "
                                    "with it; set model.chat_template to a template that renders it as given")
            e += self._end_of_turn_after(full, e)
            spans.append((s, e))
            floor = floor if calling else e
        return spans

    def _local_span(self, d: Dialogue, j: int, full: str) -> tuple[int, int] | None:
        """Calling message j by the prefix definition, where the template refuses a placeholder in its
        place (gpt-oss: a tool message must follow a call): from the end of the rendering up to j
        with the generation prompt (a prefix of `full`) as far as `full` goes on like the rendering
        through j, whole special tokens only. None where the template is not prefix-stable there."""
        try:
            p = self._template(d.messages[:j], True, d.tools, plain=False)
            q = self._template(d.messages[:j + 1], False, d.tools, plain=False)
        except InvalidRecord:
            return None
        if not full.startswith(p):
            return None
        e = self._snap(full, len(p), _common_prefix(full, q))
        s = len(p) + len(full[len(p):e]) - len(full[len(p):e].lstrip())
        return (s, s + len(full[s:e].rstrip())) if e > s else None

    def _snap(self, text: str, s: int, cut: int) -> int:
        """cut, moved back to the start of a special token it would split."""
        for sp in self.specials:
            at = text.rfind(sp, s, cut + len(sp) - 1)
            if at >= 0 and at < cut < at + len(sp):
                cut = at
        return cut

    def _tool_regions(self, d: Dialogue, text: str) -> list[tuple[int, int]]:
        """Where each tool message's content is in `text` (the whole dialogue's rendering): located
        like an assistant message, by a probe with its content replaced by a placeholder; where the
        template refuses that probe, every place the content appears."""
        regions = []
        for j, m in enumerate(d.messages):
            if m["role"] != "tool" or not m["content"].strip():
                continue
            mark = _PLACEHOLDER.format(j)
            try:
                other = self._template([*d.messages[:j], {**m, "content": mark}, *d.messages[j + 1:]], False,
                                       d.tools, plain=False)
            except InvalidRecord:
                other = None
            if other is not None and mark in other:
                regions.append(_differing(text, other))
                continue
            needle = m["content"].strip()
            needle = needle if needle in text else json.dumps(needle, ensure_ascii=False)[1:-1]
            at = text.find(needle)
            while at >= 0:
                regions.append((at, at + len(needle)))
                at = text.find(needle, at + 1)
        return regions

    def _call_start(self, d: Dialogue, j: int, text: str, s: int) -> int:
        """Where calling message j's own text starts: a routing header the model writes before the call
        (`<|start|>assistant to=get_weather<|message|>`: the model writes ` to=get_weather`) is
        between the generation prompt and the located call; it is the model's text too. Only plain
        text on the header's line is taken over this way (no markup, no line break, no special token:
        a template's own `<think></think>` before a call stays context, as before a reply)."""
        try:
            p = self._template(d.messages[:j], True, d.tools, plain=False)
        except InvalidRecord:
            return s
        gap = text[len(p):s]
        plain = gap.strip() and len(gap) < 64 and not any(c in gap for c in "<>\n[]")
        if text.startswith(p) and plain and not any(sp in gap for sp in self.specials):
            return len(p) + len(gap) - len(gap.lstrip())
        return s

    def _call_end(self, d: Dialogue, j: int, text: str, s: int, limit: int) -> int:
        """Where calling message j's own text ends in `text`, before `limit` (a tool's output that the
        template writes inside the same turn): as far as `text` goes on like the rendering of the
        dialogue up to message j, which ends with what the template writes after a call when
        nothing follows (its end-of-call or end-of-turn markers), and never inside a special token."""
        try:
            upto = self._template(d.messages[:j + 1], False, d.tools, plain=False)
            a = _common_prefix(text, upto)
        except InvalidRecord:
            a = 0
        return self._snap(text, s, min(a, limit) if a > s else limit)

    def _check_tool_spans(self, d: Dialogue, text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The check no template can fool, for dialogues with tools or tool messages: a trained span
        holds no text of a tool message (a template that writes the tool's response inside the
        model's own turn, as Gemma 4's do, gets the span cut where the response starts: the call
        trains, the response is context), a calling turn's span holds the call (its function name
        and every argument value, as the template writes them), and a reply's span its content.
        Anything else is one located error (or a counted skip), never trained."""
        regions = self._tool_regions(d, text)
        assistant = [j for j, m in enumerate(d.messages) if m["role"] == "assistant"]
        out = []
        for t, ((s, e), j) in enumerate(zip(spans, assistant)):
            m = d.messages[j]
            inside = sorted(r for r in regions if r[0] < e and r[1] > s)
            if inside:
                cut = self._call_end(d, j, text, s, inside[0][0]) if inside[0][0] > s else s
                if cut <= s or text[s:cut].strip() == "":
                    raise InvalidRecord("template_tool_output", f"assistant message {t}'s text cannot be told apart "
                                        "from a tool's output in this template's rendering (the span would train "
                                        "the tool's response); set model.chat_template to one that renders it apart")
                e = s + len(text[s:cut].rstrip())
            if m.get("tool_calls"):
                s = self._call_start(d, j, text, s)
            span = text[s:e]
            for call in m.get("tool_calls", ()):
                fn = call.get("function", call)
                missing = [v for v in [fn.get("name", ""), *_leaf_values(fn.get("arguments"))]
                           if v and not _written(v, span)]
                if missing:
                    raise InvalidRecord("template_drops_calls", f"the chat template does not write assistant turn {t}'s "
                                        f"tool call into its reply ({missing[0]!r} is not in the trained text): it "
                                        "renders none of the turn's calls, or only some (one call per message), so "
                                        "the turn would train a reply without its call; set model.chat_template to "
                                        "a template that renders them, or give one call per message")
            if m["content"].strip() and not _shows(m, span):
                raise InvalidRecord("template_rewrites", f"assistant message {t}'s content is not in its trained text "
                                    "(the chat template rewrites it); set model.chat_template to one that keeps it")
            if out and s < out[-1][1]:
                raise InvalidRecord("template_rewrites", f"assistant message {t} could not be located apart from the "
                                    "message before it in the rendering of this dialogue; set model.chat_template "
                                    "to a template that renders it as given")
            out.append((s, e))
        return out

    def _note_reasoning(self, d: Dialogue, text: str) -> None:
        """Count the reasoning_content the template leaves out of the rendering (Qwen3 keeps only the
        replies' after the last user message): nothing is dropped without a count."""
        lost = sum(1 for m in d.messages if m.get("reasoning_content", "").strip()
                   and m["reasoning_content"].strip() not in text)
        if lost:
            self.notes["reasoning_not_rendered"] = self.notes.get("reasoning_not_rendered", 0) + lost

    def _end_of_turn_after(self, text: str, at: int) -> int:
        """Characters after `at` that are trained as the end of turn: the first special token when
        only white space comes before it, else none."""
        rest = text[at:]
        lead = len(rest) - len(rest.lstrip())
        for s in self.specials:  # longest first
            if rest.startswith(s, lead):
                return lead + len(s)
        return 0

    # -- pieces and tokens ------------------------------------------------------
    def pieces(self, d: Dialogue, head: bool = True) -> tuple[list[tuple[str, int]], bool]:
        """(text, turn id or -1) pieces of the rendering, up to what max_length can reach, and
        whether they reach the end of the dialogue. With `head`, a long dialogue whose template
        layout is known renders only its first messages (rendering is a third of the cost):
        exact as long as the cut falls inside them, which render_many checks.
        Raises InvalidRecord when the template refuses the dialogue."""
        n, spans = len(d.messages), None
        layout = self._layout(tuple(m["role"] for m in d.messages)) if d.plain else None
        if layout is not None and layout.tails is None:  # not prefix-stable: glue, else located
            k, text = n, self._template(d.messages, False)
            spans = self._fast_spans(d, text, k)
        elif d.plain:
            k = self._head(d) if head and layout else n
            text = self._template(d.messages[:k], False)
            spans = self._fast_spans(d, text, k)
            if spans is None and k < n:
                k, text = n, self._template(d.messages, False)
                spans = self._fast_spans(d, text, k)
            if spans is None:
                try:
                    spans = list(self.prefix_spans(d, text))
                except InvalidRecord as bad:
                    if bad.kind not in ("template_unstable", "template_rewrites"):
                        raise
        if spans is None:  # (a plain dialogue's whole rendering is `text` already)
            k, text = n, text if d.plain else self._template(d.messages, False, d.tools, plain=False)
            if not d.plain:
                _check_rendered(d, text)
            try:
                spans = self.located_spans(d, text)
            except InvalidRecord as bad:
                if d.plain:
                    raise
                try:  # a template that refuses the probe may still be prefix-stable for this dialogue
                    spans = list(self.prefix_spans(d, text))
                except InvalidRecord:
                    raise bad from None
        if not d.plain:
            spans = self._check_tool_spans(d, text, spans)
            self._note_reasoning(d, text)
        out, prev, chars = [], 0, 0
        for t, (s, e) in enumerate(spans):  # a context-only reply (data weight 0) is a piece apart, untrained
            for piece, tid in ((text[prev:s], -1), (text[s:e], t if d.weights is None or d.weights[t] > 0 else -1)):
                out.append((piece, tid))
                chars += len(piece)
            prev = e
            if chars > self.char_cap:
                return out, True  # the cut falls inside what is already here
        if k == n:
            out.append((text[prev:], -1))
        return out, k == n

    def assemble(self, dialogue_id: str, pieces: list[tuple[str, int]], ids: list[list[int]]) -> Example | None:
        """Tokenized pieces -> Example cut to max_length; None when no trained token is left."""
        lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        tids = np.fromiter((t for _, t in pieces), dtype=np.int32, count=len(pieces))
        flat = np.fromiter((i for x in ids for i in x), dtype=np.int32, count=int(lens.sum()))
        turn = np.repeat(tids, lens)
        counts = np.bincount(turn[turn >= 0], minlength=int(tids.max(initial=-1)) + 1)
        flat, turn = flat[: self.max_length], turn[: self.max_length]
        if not (turn >= 0).any():
            return None
        n_turns = int(turn.max()) + 1
        kept = np.bincount(turn[turn >= 0], minlength=n_turns)
        return Example(dialogue_id, flat, turn, kept < counts[:n_turns])

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """One Rust call for many texts (empty texts cost nothing); the same ids as the tokenizer's
        own __call__, without character offsets (encode_batch_fast: 1.4x faster here)."""
        nonempty = [t for t in texts if t]
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        enc = iter(encode(nonempty, add_special_tokens=False)) if nonempty else iter(())
        return [next(enc).ids if t else [] for t in texts]

    def _pieces_or_skip(self, d: Dialogue, skipped: dict | None, head: bool = True):
        """pieces(d), or None after counting a template refusal in `skipped` (raised as a DataError
        naming the record when there is no counter)."""
        try:
            return self.pieces(d, head)
        except InvalidRecord as bad:
            if skipped is None:
                raise record_error(d.where, bad) from None
            skipped[bad.kind] = skipped.get(bad.kind, 0) + 1
            return None

    def render_many(self, dialogues: list[Dialogue], skipped: dict | None = None) -> list[Example | None]:
        """Render a batch (None: max_length left no trained token). A template refusal raises a
        DataError naming the record or, given a skip counter, is counted and left out."""
        kept, all_pieces, whole = [], [], []
        for d in dialogues:
            got = self._pieces_or_skip(d, skipped)
            if got is not None:
                kept.append(d)
                all_pieces.append(got[0])
                whole.append(got[1])
        out = _weighed(kept, self.assemble_many([d.dialogue_id for d in kept], all_pieces))
        # a head that max_length tokens did not fill: render the whole dialogue after all
        redo = [i for i, (ex, complete) in enumerate(zip(out, whole))
                if not complete and (ex is None or len(ex.input_ids) < self.max_length)]
        if redo:
            pieces, ok = [], []
            for i in redo:
                got = self._pieces_or_skip(kept[i], skipped, head=False)
                if got is None:
                    out[i] = _DROPPED
                else:
                    pieces.append(got[0])
                    ok.append(i)
            for i, ex in zip(ok, _weighed([kept[i] for i in ok], self.assemble_many([kept[i].dialogue_id for i in ok],
                                                                                    pieces))):
                out[i] = ex
            out = [ex for ex in out if ex is not _DROPPED]
        return out

    def assemble_many(self, ids: list[str], all_pieces: list[list[tuple[str, int]]]) -> list[Example | None]:
        """Tokenize the pieces of many dialogues and assemble them.

        Tokenizing is most of the cost, and a dialogue cut at max_length needs only its head:
        pieces are tokenized, in rounds of one Rust call each, up to a guess of the characters
        that max_length tokens cover (then half as much again per round) until each dialogue
        has max_length tokens or no piece left. Exact either way: a dialogue is assembled from a
        prefix of its pieces that holds the cut.
        """
        done: list[list[list[int]]] = [[] for _ in all_pieces]
        have = [0] * len(all_pieces)  # tokens so far
        todo = list(range(len(all_pieces)))
        budget = _GUESS_CHARS_PER_TOKEN * self.max_length
        while todo:
            take = []
            for i in todo:
                p, k, chars = all_pieces[i], len(done[i]), 0
                while k < len(p) and chars <= budget:
                    chars += len(p[k][0])
                    k += 1
                take.append(k)
            tokens = iter(self.tokenize([t for i, k in zip(todo, take) for t, _ in all_pieces[i][len(done[i]):k]]))
            for i, k in zip(todo, take):
                for _ in range(k - len(done[i])):
                    done[i].append(next(tokens))
                    have[i] += len(done[i][-1])
            todo = [i for i in todo if len(done[i]) < len(all_pieces[i]) and have[i] < self.max_length]
            budget = max(budget // 2, 1)
        return [self.assemble(did, p[:len(t)], t) for did, p, t in zip(ids, all_pieces, done)]

    def render(self, d: Dialogue) -> Example | None:
        """None when max_length truncation leaves no trained token."""
        return self.render_many([d])[0]


def _weighed(dialogues: list[Dialogue], examples: list[Example | None]) -> list[Example | None]:
    """Examples with their dialogues' data weights (per assistant message) attached."""
    for d, ex in zip(dialogues, examples):
        if ex is not None and d.weights is not None:
            ex.weights = np.asarray(d.weights, dtype=np.float32)
    return examples


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


def _common_prefix(a: str, b: str) -> int:
    return _longest(min(len(a), len(b)), lambda m: a[:m] == b[:m])


def _differing(full: str, other: str) -> tuple[int, int]:
    """The span of `full` that differs from `other` (their common prefix and suffix cut away)."""
    a = _common_prefix(full, other)
    return a, len(full) - _common_suffix(full, other, min(len(full), len(other)) - a)


def _common_suffix(a: str, b: str, limit: int) -> int:
    """Length of the longest common suffix, at most `limit`."""
    return _longest(limit, lambda m: a[len(a) - m:] == b[len(b) - m:])


_CALL_FORMS = [(False, False), (True, False), (False, True), (True, True)]  # (args as text, null content)


def _call_form(messages: list[dict], form: tuple[bool, bool]) -> list[dict]:
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


def _check_rendered(d: Dialogue, text: str) -> None:
    """A template that leaves out tool calls or tool messages (Llama 3.0's, LFM2's, Phi-3's) cannot
    train them: refused with the cause, before any span is looked for."""
    for j, m in enumerate(d.messages):
        for c in m.get("tool_calls", ()):
            name = c.get("function", c).get("name", "")
            if name and name not in text:
                raise InvalidRecord("template_drops_calls", f"the chat template does not render tool calls (message "
                                    f"{j} calls {name!r}, which is not in its rendering), so the turn would train an "
                                    "empty reply; set model.chat_template to a template that renders tool_calls")
        if m["role"] == "tool" and m["content"].strip() and not _written(m["content"].strip(), text):
            raise InvalidRecord("template_drops_tools", f"the chat template does not render tool messages (message {j}'s "
                                "output is not in its rendering), so a reply would train without the output it "
                                "answers; set model.chat_template to a template with a tool role")


def _leaf_values(args) -> list[str]:
    """The argument values a rendered call must show: every string, number and boolean leaf."""
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return [args]
    if isinstance(args, dict):
        return [v for x in args.values() for v in _leaf_values(x)]
    if isinstance(args, list):
        return [v for x in args for v in _leaf_values(x)]
    return [] if args is None else [str(args) if not isinstance(args, bool) else str(args).lower()]


def _written(value: str, text: str) -> bool:
    """value is in text as written, or JSON-escaped, or (a boolean) in Python's spelling."""
    return any(v in text for v in (value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1],
                                   value.capitalize()))


def _shows(m: dict, span: str) -> bool:
    """The located text holds the message: its content (or what a reasoning template keeps of
    it, the reply after the last `</think>`); a tool-call message with no content, some text;
    an empty reply, nothing (only its end of turn is trained, as on the prefix path)."""
    content = m["content"].strip()
    if "</think>" in content and content.rsplit("</think>", 1)[1].strip() in span:
        return True
    if not content:
        return bool(span.strip()) if m.get("tool_calls") else not span.strip()
    return content in span
