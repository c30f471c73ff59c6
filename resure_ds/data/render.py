"""Chat-template rendering: dialogue -> (input_ids, turn_ids, partial).

Trained tokens are each assistant message's content plus the template's end-of-turn token; every
other token has turn id -1 (label -100). The turn id is the 0-based index of the assistant message
in the dialogue.

Where the spans are: the definition is the prefix one (prefix.py: every prefix rendered). The fast
path (layout.py) gets the same spans from ONE rendering read with the template's layout, and renders
only the first messages of a dialogue much longer than max_length tokens. Templates that are not
prefix-stable, and dialogues with tool calls or tools, take the located path (located.py: one probe
rendering per reply); tool-call dialogues then pass the checks of toolcalls.py on every path. The
template itself, and the text helpers all of them share, are template.py.

Tokens: the rendering is tokenized piece by piece (untrained text, trained span, untrained text,
...), exactly as at inference, where the prompt ends with the generation prompt and the model
produces the reply's tokens, so a BPE merge across a span boundary can never blur which tokens are
trained. `render_many` tokenizes the pieces of many dialogues in one call of the Rust tokenizer.
Text past what max_length tokens can cover is never tokenized.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from . import IGNORE
from ..errors import InvalidRecord, record_error
from .layout import GUESS_CHARS_PER_TOKEN, Layouts, head
from .located import located_spans
from .prefix import prefix_spans
from .records import Dialogue
from .template import Template
from .toolcalls import check_rendered, check_tool_spans

RENDER_VERSION = 3  # part of the prepared-data cache key: bump when the rendered tokens would change
_UNBOUNDED = 2 ** 40  # max_length None: the whole dialogue (data.overflow split and drop)


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


_DROPPED = object()  # a dialogue skipped while re-rendering in full


class Renderer:
    def __init__(self, tokenizer, max_length: int | None, train_reasoning: bool = True):
        """max_length: tokens rendered (the rest of the dialogue is never tokenized); None: all.
        train_reasoning: an assistant message's reasoning_content, where the template renders it,
        is in its trained span (else context). `notes` counts what the template left out."""
        self.train_reasoning = train_reasoning
        self.notes: dict[str, int] = {}
        self.template = Template(tokenizer)
        self.layouts = Layouts(self.template)
        self.tok = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.max_length = max_length or _UNBOUNDED
        # No token covers more characters than its vocabulary string (a byte-level BPE string has one
        # character per byte), so text beyond max_length * longest can never fall inside the cut.
        longest = max(max(len(s) for s in tokenizer.get_vocab()), max(map(len, self.template.specials), default=1))
        self.char_cap = self.max_length * longest

    # -- spans ---------------------------------------------------------------------------------------
    def prefix_spans(self, d: Dialogue, full: str) -> Iterator[tuple[int, int]]:
        return prefix_spans(self.template, d, full, self.train_reasoning)

    def located_spans(self, d: Dialogue, full: str) -> list[tuple[int, int]]:
        return located_spans(self.template, d, full, self.train_reasoning)

    def _note_reasoning(self, d: Dialogue, text: str) -> None:
        """Count the reasoning_content the template leaves out of the rendering (Qwen3 keeps only the
        replies' after the last user message): nothing is dropped without a count."""
        lost = sum(1 for m in d.messages if m.get("reasoning_content", "").strip()
                   and m["reasoning_content"].strip() not in text)
        if lost:
            self.notes["reasoning_not_rendered"] = self.notes.get("reasoning_not_rendered", 0) + lost

    # -- pieces and tokens ------------------------------------------------------
    def pieces(self, d: Dialogue, use_head: bool = True) -> tuple[list[tuple[str, int]], bool]:
        """(text, turn id or -1) pieces of the rendering, up to what max_length can reach, and
        whether they reach the end of the dialogue. With `use_head`, a long dialogue whose template
        layout is known renders only its first messages (rendering is a third of the cost):
        exact as long as the cut falls inside them, which render_many checks.
        Raises InvalidRecord when the template refuses the dialogue."""
        n, spans, render = len(d.messages), None, self.template.render
        layout = self.layouts.of(tuple(m["role"] for m in d.messages)) if d.plain else None
        if layout is not None and layout.tails is None:  # not prefix-stable: glue, else located
            k, text = n, render(d.messages, False)
            spans = self.layouts.spans(d, text, k)
        elif d.plain:
            k = head(d, self.max_length) if use_head and layout else n
            text = render(d.messages[:k], False)
            spans = self.layouts.spans(d, text, k)
            if spans is None and k < n:
                k, text = n, render(d.messages, False)
                spans = self.layouts.spans(d, text, k)
            if spans is None:
                try:
                    spans = list(self.prefix_spans(d, text))
                except InvalidRecord as bad:
                    if bad.kind not in ("template_unstable", "template_rewrites"):
                        raise
        if spans is None:  # (a plain dialogue's whole rendering is `text` already)
            k, text = n, text if d.plain else render(d.messages, False, d.tools, plain=False)
            if not d.plain:
                check_rendered(d, text)
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
            spans = check_tool_spans(self.template, d, text, spans)
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

    def _pieces_or_skip(self, d: Dialogue, skipped: dict | None, use_head: bool = True):
        """pieces(d), or None after counting a template refusal in `skipped` (raised as a DataError
        naming the record when there is no counter)."""
        try:
            return self.pieces(d, use_head)
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
                got = self._pieces_or_skip(kept[i], skipped, use_head=False)
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
        budget = GUESS_CHARS_PER_TOKEN * self.max_length
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
