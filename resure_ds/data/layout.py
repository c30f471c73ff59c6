"""The fast path to the spans: ONE rendering of the dialogue, read with the template's layout.

The template's own text around each message (its layout) is found once per role sequence by
rendering placeholder contents, and cached; the real rendering is then checked to be exactly
layout text + (content or content.strip()) + layout text + ..., which also gives every content's
position. A template whose text depends on the contents fails that check, and the caller takes
another path (render.py). Where the layout is prefix-stable (Q_j, the rendering through assistant
message j, is a prefix of the whole), a dialogue much longer than max_length tokens can render only
its first messages (`head`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidRecord
from .records import Dialogue
from .template import Template, placeholders

LAYOUT_CACHE_SIZE = 4096
GUESS_CHARS_PER_TOKEN = 5  # English BPE averages about 4; later rounds fetch what a guess missed


@dataclass
class Layout:
    glue: list[str]                 # text before content i (glue[n]: after the last content)
    tails: dict[int, str] | None    # assistant j -> text Q_j writes after its content; None: the
                                    # template is not prefix-stable for these roles (glue only)


class Layouts:
    """Layouts per role sequence (cached), and the spans they read off a rendering."""

    def __init__(self, template: Template):
        self.t = template
        self.cache: dict[tuple, Layout | None] = {}
        self.prefixes: dict[tuple, tuple[str, str] | None] = {}

    def prefix_tail(self, roles: tuple) -> tuple[str, str] | None:
        """For roles ending in an assistant message j: (Q_j, the text Q_j writes after the content),
        rendered with placeholders and cached per prefix; None where P_j is not a prefix of Q_j."""
        if roles not in self.prefixes:
            msgs = placeholders(roles)
            p, q = self.t.render(msgs[:-1], True), self.t.render(msgs, False)
            at = q.find(msgs[-1]["content"])
            ok = q.startswith(p) and at >= len(p)
            self.prefixes[roles] = (q, q[at + len(msgs[-1]["content"]):]) if ok else None
        return self.prefixes[roles]

    def of(self, roles: tuple) -> Layout | None:
        """The template's text around each message for this role sequence (cached), or None
        when placeholders do not show one. tails is None where the layout is not prefix-stable:
        its glue still reads spans off the whole dialogue's rendering (the located path's
        spans, got from one rendering instead of one per reply)."""
        if roles in self.cache:
            return self.cache[roles]
        if len(self.cache) >= LAYOUT_CACHE_SIZE:
            self.cache.clear()
            self.prefixes.clear()
        msgs = placeholders(roles)
        layout = None
        try:
            full = self.t.render(msgs, False)
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
                    info = self.prefix_tail(roles[:j + 1])
                    if info is None or not full.startswith(info[0]):
                        tails = None
                        break
                    tails[j] = info[1]
            layout = Layout(glue, tails)
        except (ValueError, InvalidRecord):
            layout = None
        self.cache[roles] = layout
        return layout

    def spans(self, d: Dialogue, text: str, k: int) -> list[tuple[int, int]] | None:
        """Spans of the first k messages, read off `text` (the rendering of messages[:k]) with the
        layout of the whole dialogue; None where the text is not exactly that layout around the
        contents. k < all: messages[:k] ends with an assistant message, so `text` is its Q_j."""
        n = len(d.messages)
        layout = self.of(tuple(m["role"] for m in d.messages))
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
                    spans.append((pos, end + self.t.end_of_turn(layout.tails[i])))
                else:  # as the located path ends a span: the special token right after the reply
                    spans.append((pos, end + self.t.end_of_turn_after(text, end)))
            pos = end
        last = layout.tails[k - 1] if k < n else layout.glue[-1]
        return spans if pos + len(last) == len(text) else None


def head(d: Dialogue, max_length: int) -> int:
    """How many messages to render: through the first assistant message by which the contents
    alone pass a guess of the characters max_length tokens cover; all when none does."""
    budget, chars = GUESS_CHARS_PER_TOKEN * max_length, 0
    for i, m in enumerate(d.messages):
        chars += len(m["content"].strip())
        if chars > budget and m["role"] == "assistant":
            return i + 1
    return len(d.messages)
