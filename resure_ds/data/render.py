"""Chat-template rendering: dialogue -> (input_ids, labels, turn_ids, partial).

Trained tokens are each assistant message's content plus the template's
end-of-turn token; all other tokens get label -100 and turn id -1. The
turn id is the 0-based index of the assistant message in the dialogue.

How spans are found: for assistant message j we render the dialogue up to
j with the generation prompt (P_j) and up to and including j (Q_j). The
template must be prefix-stable: P_j is a prefix of Q_j and Q_j a prefix
of the whole rendering. Q_j[len(P_j):] holds the content, then the
end-of-turn token (the first special token after the content).
The rendering is tokenized piece by piece (untrained text, trained span,
untrained text, ...), exactly as at inference, where the prompt ends with
the generation prompt and the model produces the reply's tokens: a BPE
merge across a span boundary (e.g. a newline with the reply's first space)
can then never blur which tokens are trained.
Cost: per assistant turn inside max_length, one template render and two
tokenizer calls; turns past the cut are never rendered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .records import DataError, Dialogue

IGNORE = -100


@dataclass
class Example:
    dialogue_id: str
    input_ids: list[int]
    labels: list[int]
    turn_ids: list[int]
    partial: list[bool]  # per turn id present in the example: cut by max_length


class Renderer:
    def __init__(self, tokenizer, max_length: int):
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("the tokenizer must be a fast (Rust) tokenizer: turn spans need offset mappings")
        if not tokenizer.chat_template:
            raise DataError("the tokenizer has no chat template; set model.chat_template to a Jinja template")
        self.tok = tokenizer
        self.max_length = max_length
        # Longest first, so '<|im_end|>' wins over a shorter special token it contains.
        specials = set(tokenizer.all_special_tokens) | {str(t) for t in tokenizer.get_added_vocab()}
        self.specials = sorted((s for s in specials if s), key=len, reverse=True)

    def _template(self, messages, gen: bool, where: str) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja raises for roles the template refuses
            raise DataError(f"{where}: the chat template refused this dialogue ({e}). "
                            "Fix the record or use a template that accepts its roles") from None

    def spans(self, d: Dialogue, full: str) -> Iterator[tuple[int, int]]:
        """Lazily yield the (start, end) character span of each assistant message's trained text."""
        for j, m in enumerate(d.messages):
            if m["role"] != "assistant":
                continue
            p = self._template(d.messages[:j], True, d.where)
            q = self._template(d.messages[:j + 1], False, d.where)
            if not (q.startswith(p) and full.startswith(q)):
                raise DataError(f"{d.where}: the chat template is not prefix-stable at message {j}, so "
                                "assistant spans cannot be located; use a prefix-stable template")
            seg = q[len(p):]
            content = m["content"]
            at = seg.find(content)
            if at < 0:
                content = content.strip()
                at = seg.find(content)
            if at < 0:
                raise DataError(f"{d.where}: the chat template rewrites assistant message {j}; "
                                "its text is not in the rendering")
            c_end = at + len(content)
            rest = seg[c_end:]
            hits = [(rest.find(s), s) for s in self.specials if s in rest]
            if hits:
                pos, s = min(hits, key=lambda h: (h[0], -len(h[1])))
                end = c_end + pos + len(s)
            else:
                end = c_end + len(rest.rstrip())
            yield len(p) + at, len(p) + end

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def render(self, d: Dialogue) -> Example | None:
        """None when max_length truncation leaves no trained token."""
        full = self._template(d.messages, False, d.where)
        ids: list[int] = []
        turn: list[int] = []
        counts: list[int] = []  # trained tokens per turn before truncation
        prev = 0
        for t, (s, e) in enumerate(self.spans(d, full)):
            if len(ids) >= self.max_length:
                break  # this turn starts past the cut: never rendered further
            head, body = self._ids(full[prev:s]), self._ids(full[s:e])
            ids += head + body
            turn += [-1] * len(head) + [t] * len(body)
            counts.append(len(body))
            prev = e
        else:
            tail = self._ids(full[prev:])
            ids, turn = ids + tail, turn + [-1] * len(tail)
        ids, turn = ids[: self.max_length], np.asarray(turn[: self.max_length], dtype=np.int64)
        if not (turn >= 0).any():
            return None
        n_turns = int(turn.max()) + 1
        kept = np.bincount(turn[turn >= 0], minlength=n_turns)
        labels = np.where(turn >= 0, np.asarray(ids), IGNORE)
        partial = [bool(kept[t] < counts[t]) for t in range(n_turns)]
        return Example(d.dialogue_id, ids, labels.tolist(), turn.tolist(), partial)
