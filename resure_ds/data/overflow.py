"""What becomes of a dialogue longer than data.max_length tokens (data.overflow).

  split  (default) the dialogue becomes several rows (windows), each ending at
         the end of an assistant reply, so that every reply trains once,
         whole. A window holds the replies u..v not trained yet, the message
         each of them answers (the text after the reply before it), and then
         as much earlier history as fits in max_length, read backwards: a
         window is a slice of the dialogue's own rendering. Earlier replies
         in that history are context there (label -100). Each turn keeps its
         index in the dialogue, so the statistics bucket it by its true depth
         and the audit, report and filter name the original dialogue and turn.
         The one thing left partial: a reply longer than max_length on its
         own trains its first tokens, after the message it answers (at most
         half the window), flagged partial (no statistics), counted.
  cut    the rendering's first max_length tokens: the reply the cut falls in
         trains partially (flagged), every later reply never trains.
  drop   a dialogue longer than max_length is left out, counted.

Why split is the default: cut loses the later turns of every long dialogue,
and those are the turns the statistics' deeper buckets are about (in the
embedded default's corpus cut lost the last turn of a quarter of the
dialogues); drop loses the whole dialogue. split costs the history repeated
in later windows (measured in the README) and one full tokenization of each
long dialogue during prepare.

What split changes: resure.level=sample and resure.propagate=forward act on a
row, so on a window of a long dialogue, not on the whole dialogue.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render import Example
from .shards import spans

POLICIES = ("split", "cut", "drop")


@dataclass
class OverflowCounts:
    """What the overflow policy did, for the manifest."""
    split: int = 0        # dialogues longer than max_length that became several rows
    split_rows: int = 0   # rows those dialogues became
    long_turns: int = 0   # replies longer than max_length alone: trained partially (split)
    dropped: int = 0      # dialogues left out (drop)
    cut: int = 0          # dialogues that reached max_length (cut): later replies never trained

    def to_dict(self) -> dict:
        return {"split": self.split, "split_rows": self.split_rows, "long_turns": self.long_turns,
                "dropped": self.dropped, "cut": self.cut}


def windows(ex: Example, max_length: int) -> list[Example]:
    """A fully rendered dialogue -> its rows under `split` (module docstring). A dialogue that
    fits is its own single row, unchanged."""
    n = len(ex.input_ids)
    if n <= max_length:
        return [ex]
    turns, starts, ends = spans(ex.turn_ids)  # a rendered turn is one contiguous span
    asks = np.r_[0, ends[:-1]]  # where the message a reply answers begins: after the reply before it
    out, u, L = [], 0, max_length
    while u < len(turns):
        if ends[u] - starts[u] > L:  # one reply longer than a window: its first tokens, flagged
            a = max(int(asks[u]), int(starts[u]) - L // 2)
            out.append(_window(ex, a, a + L, turns[u:u + 1], partial=True))
            u += 1
            continue
        v = u  # the most replies that fit with the message each answers
        while v + 1 < len(turns) and ends[v + 1] - asks[u] <= L:
            v += 1
        b = int(ends[v])
        out.append(_window(ex, max(0, b - L), b, turns[u:v + 1], partial=False))
        u = v + 1
    return out


def _window(ex: Example, a: int, b: int, keep: np.ndarray, partial: bool) -> Example:
    """Tokens [a, b) of the rendering with the turns `keep` trained (the others there are context)."""
    tids = ex.turn_ids[a:b].copy()
    tids[~np.isin(tids, keep)] = -1
    flags = np.zeros(int(keep.max()) + 1, dtype=bool)
    flags[-1] = partial
    return Example(ex.dialogue_id, ex.input_ids[a:b].copy(), tids, flags, ex.weights)


def apply(ex: Example, policy: str, max_length: int, counts: OverflowCounts) -> list[Example]:
    """The rows of one rendered dialogue under `policy`. `ex` is the full rendering for split and
    drop; for cut, the renderer's own cut (it never tokenizes past max_length)."""
    if policy == "cut":
        counts.cut += bool(ex.partial.any()) or len(ex.input_ids) >= max_length
        return [ex]
    if len(ex.input_ids) <= max_length:
        return [ex]
    if policy == "drop":
        counts.dropped += 1
        return []
    rows = windows(ex, max_length)
    counts.split += 1
    counts.split_rows += len(rows)
    counts.long_turns += sum(bool(r.partial.any()) for r in rows)
    return rows


def summary(counts: dict) -> str:
    """One line of a manifest's (or several manifests' summed) counts: what the policy did."""
    o = counts["overflow"]
    return (f"{o['split']:,} dialogue(s) split into {o['split_rows']:,} rows ({o['long_turns']:,} reply(ies) longer "
            f"than max_length trained partially); {o['cut']:,} cut (later replies not trained); "
            f"{o['dropped']:,} dropped")
