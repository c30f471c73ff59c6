"""The definition of the spans, computed: for assistant message j, render the dialogue up to j with
the generation prompt (P_j) and up to and including j (Q_j); the template must be prefix-stable (P_j
a prefix of Q_j, Q_j a prefix of the whole rendering); the trained span is the content after P_j plus
the first special token after it (the end-of-turn token). Two template calls per reply, so a dialogue
of n replies costs O(n^2) characters: the other paths get the same spans cheaper, and the tests hold
them to this one.
"""
from __future__ import annotations

from typing import Iterator

from ..errors import InvalidRecord
from .records import Dialogue
from .template import Template, common_prefix


def prefix_spans(t: Template, d: Dialogue, full: str, train_reasoning: bool = True) -> Iterator[tuple[int, int]]:
    """Raises InvalidRecord where the template is not prefix-stable for this dialogue or rewrites an
    assistant message (a template may do that only for some shapes, e.g. one that injects a default
    system prompt before a dialogue that opens with an assistant message): a located error, or a
    counted skip."""
    for j, m in enumerate(d.messages):
        if m["role"] != "assistant":
            continue
        p = t.render(d.messages[:j], True, d.tools, d.plain)
        q = t.render(d.messages[:j + 1], False, d.tools, d.plain)
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
        thought = m.get("reasoning_content", "").strip() if train_reasoning else ""
        if thought and 0 <= seg.find(thought) < at:  # the reasoning the template writes before the reply
            start = seg.find(thought)
        yield len(p) + start, len(p) + c_end + t.end_of_turn(seg[c_end:])


def local_span(t: Template, d: Dialogue, j: int, full: str) -> tuple[int, int] | None:
    """Calling message j by the prefix definition, where the template refuses a placeholder in its
    place (gpt-oss: a tool message must follow a call): from the end of the rendering up to j
    with the generation prompt (a prefix of `full`) as far as `full` goes on like the rendering
    through j, whole special tokens only. None where the template is not prefix-stable there."""
    try:
        p = t.render(d.messages[:j], True, d.tools, plain=False)
        q = t.render(d.messages[:j + 1], False, d.tools, plain=False)
    except InvalidRecord:
        return None
    if not full.startswith(p):
        return None
    e = t.snap(full, len(p), common_prefix(full, q))
    s = len(p) + len(full[len(p):e]) - len(full[len(p):e].lstrip())
    return (s, s + len(full[s:e].rstrip())) if e > s else None
