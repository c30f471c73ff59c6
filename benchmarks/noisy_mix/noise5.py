"""Round 5's noise, split once into what training sees and what only the probes and the detector see.

  canned      assistant boilerplate: 100 strings for training and 100 for the probes, each half built
              from its own openers and bodies (no phrase shared between the halves)
  weak        a template bot's reply to the user's last message (ELIZA-like reflections: fluent, poor,
              no knowledge); its 12 training templates and 12 probe templates are disjoint; the bot is
              not the reference model (round 4's weak replies were the base model's own)
  degenerate  a decode gone wrong: a loop (a phrase of the genuine reply said 3-6 times) or a cut-off
              (the genuine reply stopped at 30-60% of its words)
  offtopic    a genuine reply from another conversation (training: the train split's replies; probes:
              the test split's)

The detector (Detector) is a logistic regression over hashed words and a few shape features of a (context, reply) pair, fit once, before any training run, on the probe-only
noise against human replies of the validation split; it is evaluated on the training halves and on
the test split's human replies, which it never saw. It cannot tell an off-topic reply from a genuine
one by its text, so off-topic uptake is measured by the two-choice probe only.
"""
from __future__ import annotations

import hashlib
import math
import random
import re

import numpy as np

KINDS = ("canned", "weak", "degenerate", "offtopic")
CLASSES = ("human", "canned", "weak", "loop")  # what the detector tells apart (a cut-off reads like a terse human one)

_OPEN = {
    "train": ["As an AI language model,", "I'm sorry, but", "Thank you for your message!", "Great question!",
              "I understand your concern.", "I appreciate you reaching out.", "That's an interesting point.",
              "I'm just a virtual assistant, so", "Unfortunately,", "Certainly!"],
    "probe": ["Hello! As your digital helper,", "Apologies,", "Thanks so much for asking!", "What a wonderful query!",
              "I hear you.", "Thanks for getting in touch.", "That is a fascinating topic.",
              "Being a computer program,", "Regrettably,", "Absolutely!"],
}
_BODY = {
    "train": ["I cannot provide personal opinions on that topic.", "I am not able to help with this request.",
              "there are many factors to consider here.", "it depends on your specific situation.",
              "I don't have access to real-time information.", "please consult a qualified professional.",
              "I recommend checking official sources.", "I'm here to help with any questions you have.",
              "everyone has a different perspective on this.", "I can't browse the internet."],
    "probe": ["I do not hold beliefs or feelings about this.", "this is outside what I can assist with.",
              "the answer varies from person to person.", "it really comes down to your circumstances.",
              "my knowledge has a cutoff date.", "you should speak with an expert.",
              "I suggest looking at trusted references.", "feel free to ask me anything else.",
              "opinions differ widely on this matter.", "I have no ability to search the web."],
}
_TEMPLATES = {
    "train": ["Why do you say {x}?", "How does {x} make you feel?", "Tell me more about {x}.",
              "Do you often think about {x}?", "What do you mean by {x}?", "Is {x} important to you?",
              "I see. {X} sounds interesting.", "Interesting, {x}. Go on.", "Can you elaborate on {x}?",
              "What makes you say {x}?", "Does it please you to say {x}?", "You seem sure about {x}."],
    "probe": ["So you feel that {x}?", "Let us talk more about {x}.", "Please explain {x} a bit more.",
              "You mentioned {x}. Why is that?", "Does {x} bother you?", "How long have you felt {x}?",
              "And what about {x}?", "Earlier you said {x}. Say more.", "Would you like to discuss {x}?",
              "Hmm, {x}. Really?", "I wonder about {x} too.", "Perhaps {x} matters to you."],
}
_REFLECT = {"i": "you", "me": "you", "my": "your", "mine": "yours", "am": "are", "i'm": "you're", "we": "you",
            "you": "I", "your": "my", "yours": "mine", "you're": "I'm", "myself": "yourself"}


def canned_pool(half: str) -> list[str]:
    """The 100 boilerplate strings of one half ('train' or 'probe')."""
    return [f"{o} {b[0].upper() + b[1:] if o.endswith(('!', '.')) else b}" for o in _OPEN[half] for b in _BODY[half]]


def _fragment(text: str, rng: random.Random) -> str:
    words = re.findall(r"[A-Za-z']+", text.lower())
    if not words:
        return "that"
    n = min(len(words), rng.randint(2, 5))
    start = rng.randint(0, len(words) - n)
    return " ".join(_REFLECT.get(w, w) for w in words[start:start + n])


def weak_reply(messages: list[dict], j: int, half: str, rng: random.Random) -> str:
    """The template bot's reply to the user message before message j."""
    user = next((m["content"] for m in reversed(messages[:j]) if m["role"] == "user"), "")
    x = _fragment(user, rng)
    return rng.choice(_TEMPLATES[half]).format(x=x, X=x[:1].upper() + x[1:])


def loop_reply(text: str, rng: random.Random) -> str:
    words = text.split() or ["okay"]
    n = min(len(words), rng.randint(3, 8))
    phrase = " ".join(words[:n]).rstrip(".!?,")
    return " ".join([phrase] * rng.randint(3, 6))


def cutoff_reply(text: str, rng: random.Random) -> str:
    words = text.split()
    if len(words) < 4:
        return text[: max(1, len(text) // 2)].rstrip(".!?")
    return " ".join(words[: max(2, int(len(words) * rng.uniform(0.3, 0.6)))]).rstrip(".!?,")


def make_noise(kind: str, messages: list[dict], j: int, half: str, pool: list[str], rng: random.Random) -> str:
    """The reply at message j as noise of `kind` from one half (pool: off-topic replies of that half)."""
    text = messages[j]["content"]
    if kind == "canned":
        return rng.choice(canned_pool(half))
    if kind == "weak":
        return weak_reply(messages, j, half, rng)
    if kind == "degenerate":
        return loop_reply(text, rng) if rng.random() < 0.5 else cutoff_reply(text, rng)
    if kind == "offtopic":
        other = rng.choice(pool)
        while other.strip() == text.strip() and len(pool) > 1:
            other = rng.choice(pool)
        return other
    raise ValueError(f"unknown noise kind {kind!r}; known: {KINDS}")


# -- the detector -------------------------------------------------------------------------------------
DIM = 1 << 15


def _h(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little") % DIM


def shape(context: str, reply: str) -> list[float]:
    """Shape features: repetition, ending, length, and how much of the reply is the user's own words."""
    w = reply.lower().split()
    grams = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
    rep3 = 1 - len(set(grams)) / len(grams) if grams else 0.0
    user = set(re.findall(r"[a-z']+", context.lower()))
    mine = re.findall(r"[a-z']+", reply.lower())
    overlap = sum(x in user for x in mine) / len(mine) if mine else 0.0
    ends = reply.strip()[-1:] in ".!?)\"'" if reply.strip() else False
    cap = reply.strip()[:1].isupper() if reply.strip() else False
    long = sum(len(x) >= 7 for x in mine) / len(mine) if mine else 0.0
    mean_len = sum(map(len, mine)) / len(mine) if mine else 0.0
    sentences = len(re.findall(r"[.!?](\s|$)", reply))
    first = sum(x in ("i", "i'm", "my", "me") for x in mine) / len(mine) if mine else 0.0
    second = sum(x in ("you", "your", "you're") for x in mine) / len(mine) if mine else 0.0
    return [rep3, float(ends), math.log1p(len(w)), overlap, float("?" in reply), float(len(w) <= 2),
            float(cap), long, mean_len / 10, min(sentences, 4) / 4, float("," in reply), first, second,
            float(reply.count("!") > 0)]


def features(context: str, reply: str) -> tuple[list[int], list[float]]:
    """Hashed word ids (binary) and the shape features of one pair. No word pairs or character n-grams:
    those learn the probe half's phrases, which the training half does not share (on a trial split of
    the validation data, canned recall on the held-out half fell from 0.96 to 0.16 with them)."""
    words = re.findall(r"[a-z']+|[.!?,]", reply.lower())
    return sorted({_h("w:" + x) for x in words}), shape(context, reply)


class Detector:
    """Multinomial logistic regression over CLASSES, fit with full-batch L-BFGS (torch, CPU)."""

    def __init__(self, l2: float = 1e-2, seed: int = 0):
        self.l2, self.seed = l2, seed
        self.W = None

    def _matrix(self, pairs: list[tuple[str, str]]):
        import torch

        rows, cols, dense = [], [], []
        for i, (c, r) in enumerate(pairs):
            ids, sh = features(c, r)
            rows += [i] * len(ids)
            cols += ids
            dense.append(sh)
        x = torch.sparse_coo_tensor(torch.tensor([rows, cols]), torch.ones(len(rows)), (len(pairs), DIM)).coalesce()
        return x, torch.tensor(dense, dtype=torch.float32)

    def fit(self, pairs: list[tuple[str, str]], labels: list[str]) -> "Detector":
        import torch

        torch.manual_seed(self.seed)
        x, d = self._matrix(pairs)
        y = torch.tensor([CLASSES.index(lab) for lab in labels])
        k = len(CLASSES)
        W = torch.zeros(DIM, k, requires_grad=True)
        V = torch.zeros(d.shape[1], k, requires_grad=True)
        b = torch.zeros(k, requires_grad=True)
        counts = torch.bincount(y, minlength=k).float()
        cw = (counts.sum() / (k * counts.clamp(min=1)))  # classes weighed equally
        opt = torch.optim.LBFGS([W, V, b], max_iter=300, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            logits = torch.sparse.mm(x, W) + d @ V + b
            loss = torch.nn.functional.cross_entropy(logits, y, weight=cw) + self.l2 * (W.pow(2).sum() + V.pow(2).sum())
            loss.backward()
            return loss

        opt.step(closure)
        self.W, self.V, self.b = W.detach(), V.detach(), b.detach()
        return self

    def predict(self, pairs: list[tuple[str, str]]) -> list[str]:
        import torch

        if not pairs:
            return []
        x, d = self._matrix(pairs)
        logits = torch.sparse.mm(x, self.W) + d @ self.V + self.b
        return [CLASSES[i] for i in logits.argmax(1).tolist()]

    def state(self) -> dict:
        """Weights as lists (results.json keeps the fitted detector's checksum, not the weights)."""
        h = hashlib.sha256(self.W.numpy().tobytes() + self.V.numpy().tobytes() + self.b.numpy().tobytes())
        return {"sha256": h.hexdigest(), "l2": self.l2}


def precision_recall_per_class(true: list[str], pred: list[str]) -> dict:
    out = {}
    t, p = np.asarray(true), np.asarray(pred)
    for c in CLASSES:
        tp = int(((t == c) & (p == c)).sum())
        out[c] = {"n": int((t == c).sum()), "flagged": int((p == c).sum()),
                  "precision": tp / int((p == c).sum()) if (p == c).any() else None,
                  "recall": tp / int((t == c).sum()) if (t == c).any() else None}
    noise_t, noise_p = t != "human", p != "human"
    tp = int((noise_t & noise_p).sum())
    out["any noise"] = {"n": int(noise_t.sum()), "flagged": int(noise_p.sum()),
                        "precision": tp / int(noise_p.sum()) if noise_p.any() else None,
                        "recall": tp / int(noise_t.sum()) if noise_t.any() else None}
    return out
