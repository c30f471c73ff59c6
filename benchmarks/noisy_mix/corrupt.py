"""Mixed-quality data with ground truth, from any corpus the readers accept.

Dialogues are split into train / validation / test by a hash of the dialogue
id (stable across runs and machines). In a fraction `noise` of training
dialogues one assistant turn is corrupted; with probability `early` it is
the first assistant turn, else one of the later ones (uniformly). Kinds:

  swap      the reply is an assistant reply taken from another dialogue
  shuffle   the reply's words in random order
  random    random characters of the reply's length
  echo      the user's preceding message repeated back
  truncate  the reply cut mid-sentence (between 20% and 60% of its words)

A corruption that would leave the text unchanged (an echo of an identical
user message) becomes `random`. Labels (dialogue_id, turn, kind) are written
beside the data; validation and test stay clean.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import string

from resure_ds.data.records import read_dialogues

KINDS = ("swap", "shuffle", "random", "echo", "truncate")


def write_jsonl(path: str, rows) -> None:
    """Written whole, then renamed into place: a study worker beside this one never reads half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def split_of(dialogue_id: str, val: float = 0.1, test: float = 0.1) -> str:
    h = int(hashlib.sha256(dialogue_id.encode()).hexdigest()[:8], 16) / 16 ** 8
    return "test" if h < test else "val" if h < test + val else "train"


def corrupt_reply(kind: str, messages: list[dict], j: int, pool: list[str], rng: random.Random) -> str:
    text = messages[j]["content"]
    words = text.split()
    if kind == "swap":
        other = rng.choice(pool)
        while other == text and len(set(pool)) > 1:
            other = rng.choice(pool)
        return other
    if kind == "shuffle":
        if len(set(words)) < 2:
            words = words + ["the", "reply"]
        out = words[:]
        while out == words:
            rng.shuffle(out)
        return " ".join(out)
    if kind == "random":
        alphabet = string.ascii_letters + string.digits + string.punctuation + " "
        return "".join(rng.choice(alphabet) for _ in range(max(8, len(text))))
    if kind == "echo":
        prev = [m["content"] for m in messages[:j] if m["role"] == "user"]
        return prev[-1] if prev else text[::-1]
    if kind == "truncate":
        if len(words) < 3:
            return text[: max(1, len(text) // 2)]
        return " ".join(words[: max(1, int(len(words) * rng.uniform(0.2, 0.6)))])
    raise ValueError(f"unknown corruption kind {kind!r}; known: {KINDS}")


def make_study_data(source, out_dir: str, noise: float, early: float, seed: int,
                    kinds: tuple[str, ...] = KINDS) -> dict:
    """Write train.jsonl, val.jsonl, test.jsonl and labels.jsonl; return counts."""
    rng = random.Random(seed)
    splits = {"train": [], "val": [], "test": []}
    for d in read_dialogues(source, skip_invalid=True):
        splits[split_of(d.dialogue_id)].append(d)
    pool = [m["content"] for d in splits["train"] for m in d.messages if m["role"] == "assistant"]
    labels = []
    train = splits["train"]
    chosen = set(rng.sample(range(len(train)), round(noise * len(train))))
    for i, d in enumerate(train):
        if i not in chosen:
            continue
        turns = [j for j, m in enumerate(d.messages) if m["role"] == "assistant"]
        t = 0 if len(turns) == 1 or rng.random() < early else rng.randrange(1, len(turns))
        kind = kinds[len(labels) % len(kinds)]
        new = corrupt_reply(kind, d.messages, turns[t], pool, rng)
        if new == d.messages[turns[t]]["content"]:  # e.g. an echo of an identical user message
            kind, new = "random", corrupt_reply("random", d.messages, turns[t], pool, rng)
        d.messages[turns[t]] = {"role": "assistant", "content": new}
        labels.append({"dialogue_id": d.dialogue_id, "turn": t, "kind": kind})
    os.makedirs(out_dir, exist_ok=True)
    for name, ds in splits.items():
        write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), [{"id": d.dialogue_id, "messages": d.messages} for d in ds])
    write_jsonl(os.path.join(out_dir, "labels.jsonl"), labels)
    return {name: len(ds) for name, ds in splits.items()} | {"corrupted": len(labels)}
