"""The located path to the spans, for templates that rewrite history (Qwen3 renders `<think></think>`
only after the last user query; Mistral v0.3 moves the system message into the last user turn) and
for dialogues with tool calls or tools: ONE rendering of the whole dialogue (what the model sees at
inference for it), and for each assistant message j a probe rendering with that message replaced by
a placeholder. What differs between the two (their common prefix and suffix cut away) is message
j's own text there: its content, or its tool-call text as the template writes it, and nothing of the
template's own text around it. The span is that text plus the end-of-turn token that follows it.
Checked: the probe's differing text holds the placeholder, the spans come in order, and the content
(or, where the template keeps only the reply after a `</think>`, that reply) is in its span; else the
dialogue is refused (template_rewrites).
"""
from __future__ import annotations

from ..errors import InvalidRecord
from .prefix import local_span
from .records import Dialogue
from .template import PLACEHOLDER, Template, differing, shows


def located_spans(t: Template, d: Dialogue, full: str, train_reasoning: bool = True) -> list[tuple[int, int]]:
    """Spans read off `full` (the rendering of the whole dialogue) by one probe rendering per
    assistant message. Raises InvalidRecord where they cannot be located."""
    spans, floor = [], 0
    for j, m in enumerate(d.messages):
        if m["role"] != "assistant":
            continue
        mark = PLACEHOLDER.format(j)
        keep = {} if train_reasoning or "reasoning_content" not in m else {
            "reasoning_content": m["reasoning_content"]}  # the same in both: not in the span
        probe = [*d.messages[:j], {"role": "assistant", "content": mark, **keep}, *d.messages[j + 1:]]
        try:
            other = t.render(probe, False, d.tools, plain=d.plain)
        except InvalidRecord:
            local = local_span(t, d, j, full) if m.get("tool_calls") else None
            if local is not None and local[0] >= floor:  # harmony: a tool message needs its call
                spans.append(local)
                continue
            raise InvalidRecord("template_rewrites", f"the chat template renders this dialogue but refuses it with "
                                f"assistant message {j} as plain text (a template that checks role order with "
                                "tool calls left out), so that message cannot be located; set "
                                "model.chat_template to one that renders it") from None
        s, e = differing(full, other)
        b = len(full) - e
        calling = bool(m.get("tool_calls"))  # its span may run over a tool's output: cut and ordered later
        if mark not in other[s:len(other) - b] or (s < floor and not calling) or not shows(m, full[s:e]):
            raise InvalidRecord("template_rewrites", f"assistant message {j} could not be located in the rendering "
                                "of this dialogue: the chat template rewrites it, or changes other messages "
                                "with it; set model.chat_template to a template that renders it as given")
        e += t.end_of_turn_after(full, e)
        spans.append((s, e))
        floor = floor if calling else e
    return spans
