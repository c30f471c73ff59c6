"""Round 4's noise: what mixed-quality dialogue corpora hold, built by the study's own code.

  weak      a reply the base model writes for the true context (greedy, short): fluent but poor
  generic   canned, evasive or boilerplate text ("As an AI language model, ...")
  offtopic  an assistant reply taken from another dialogue
  repeat    the reply's first sentence said again and again (degenerate repetition)
  truncate  the reply cut mid-sentence (20-60% of its words)
  random    random characters (a sanity kind: any perplexity filter finds it)

A fraction `noise` of the sampled training dialogues gets one corrupted assistant turn. The turn is
drawn with weights inversely proportional to how many training turns sit at its depth, so that the
corrupted share of every depth bucket stays near the pooled rate (rounds 1-3 put every corruption
on the first reply, where a share past 31% can never be down-weighted: docs/method.md s.4); the
study reports the share per bucket.
"""
from __future__ import annotations

import random
import re
from collections import Counter

from benchmarks.noisy_mix.corrupt import corrupt_reply

KINDS = ("weak", "generic", "offtopic", "repeat", "truncate", "random")
GENERIC = (
    "I'm sorry, but I can't help with that.",
    "As an AI language model, I don't have personal opinions or feelings.",
    "Thank you for your message! Let me know if there is anything else I can help you with.",
    "That's a great question! There are many factors to consider, and it really depends on the situation.",
    "I understand. Could you please provide more details so I can assist you better?",
    "I'm not able to answer that right now. Please try again later.",
    "Interesting! Everyone has their own perspective on this topic.",
    "Sure! I'd be happy to help. What would you like to know?",
)
GENERIC_MARKERS = ("as an ai", "language model", "i'm sorry", "i can't help", "let me know if",
                   "happy to help", "great question", "provide more details", "try again later",
                   "their own perspective", "anything else i can")


def first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?])(\s|$)", text.strip())
    return (m.group(1) if m else text.strip()) or text


def corrupt(kind: str, messages: list[dict], j: int, pool: list[str], rng: random.Random,
            weak: str | None = None) -> str:
    """The reply at message j, corrupted by `kind` (weak: the base model's reply, given)."""
    text = messages[j]["content"]
    if kind == "weak":
        return weak if weak and weak.strip() and weak.strip() != text.strip() else rng.choice(GENERIC)
    if kind == "generic":
        return rng.choice(GENERIC)
    if kind == "repeat":
        s = first_sentence(text)
        return " ".join([s] * rng.randint(3, 5))
    if kind in ("offtopic", "truncate", "random"):  # the earlier rounds' swap, truncate and random
        return corrupt_reply("swap" if kind == "offtopic" else kind, messages, j, pool, rng)
    raise ValueError(f"unknown corruption kind {kind!r}; known: {KINDS}")


def choose(rows: list[dict], noise: float, rng: random.Random, trained: list[int] | None = None
           ) -> list[tuple[int, int]]:
    """(row, assistant turn) to corrupt: a `noise` share of the rows, one turn each, drawn with
    weights 1 / (training turns at that depth) so every depth bucket gets about the pooled rate.
    trained: per row, how many of its turns train whole within max_length (default: all); a
    corruption past the cut would never be trained, so only those turns are drawn."""
    turns = trained if trained is not None else [sum(m["role"] == "assistant" for m in r["messages"]) for r in rows]
    at_depth = Counter(t for n in turns for t in range(n))
    picked = rng.sample([i for i, n in enumerate(turns) if n], round(noise * sum(1 for n in turns if n)))
    out = []
    for i in sorted(picked):
        w = [1.0 / at_depth[t] for t in range(turns[i])]
        out.append((i, rng.choices(range(turns[i]), weights=w)[0]))
    return out


def contamination(turns: list[int], chosen: list[tuple[int, int]], buckets: int = 8) -> list[float]:
    """Corrupted share of the trained turns per depth bucket (depth min(t, buckets - 1)); turns: per
    row, its turns that train whole."""
    total, bad = Counter(), Counter()
    for n in turns:
        for t in range(n):
            total[min(t, buckets - 1)] += 1
    for _, t in chosen:
        bad[min(t, buckets - 1)] += 1
    return [bad[b] / total[b] if total[b] else 0.0 for b in range(buckets)]


def generation_measures(replies: list[str]) -> dict:
    """What a model writes: mean length (words), share of repeated word 3-grams, share of replies
    holding a canned phrase."""
    def rep3(s):
        w = s.lower().split()
        grams = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
        return 1 - len(set(grams)) / len(grams) if grams else 0.0

    n = max(len(replies), 1)
    return {"replies": len(replies), "mean_words": sum(len(r.split()) for r in replies) / n,
            "repeated_3gram_rate": sum(rep3(r) for r in replies) / n,
            "generic_rate": sum(any(g in r.lower() for g in GENERIC_MARKERS) for r in replies) / n}
