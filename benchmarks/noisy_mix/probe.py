"""Outcomes that see noise being learned, on clean held-out dialogues.

For every test dialogue the first assistant reply is replaced, once per corruption kind, by the
study's own corruption code (`probe-<kind>.jsonl`); `probe-clean.jsonl` keeps it genuine.

  uptake margin, per kind   token-mean loss of the corrupted first reply minus that of the
                            genuine one, in the same context. Training that learns to produce a
                            kind of noise shrinks its margin.
  later turns               token-mean loss of the later, genuine replies (turn 2 on) of the same
                            dialogues after a genuine first reply (`later_clean`), and after a
                            corrupted one minus after the genuine one, per kind and their mean
                            (`later_delta`; on the later replies both renderings keep whole or cut
                            to the same length): the damage a bad turn does to what follows.
"""
from __future__ import annotations

import os
import random

from benchmarks.noisy_mix.corrupt import KINDS, corrupt_reply, write_jsonl


def make_probe_data(test: list[dict], pool: list[str], out_dir: str, seed: int = 0) -> dict:
    """Write probe-clean.jsonl and probe-<kind>.jsonl (first assistant reply corrupted) for the test
    dialogues that have an assistant reply; return {name: path}."""
    rows = [r for r in test if any(m["role"] == "assistant" for m in r["messages"])]
    paths = {"clean": os.path.join(out_dir, "probe-clean.jsonl")}
    files = {"clean": rows}
    for kind in KINDS:
        rng = random.Random(f"{seed}-{kind}")
        files[kind] = []
        for r in rows:
            msgs = [dict(m) for m in r["messages"]]
            j = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            new = corrupt_reply(kind, msgs, j, pool, rng)
            if new == msgs[j]["content"]:  # an echo of an identical message: no probe for this one
                new = corrupt_reply("random", msgs, j, pool, rng)
            msgs[j] = {"role": "assistant", "content": new}
            files[kind].append({"id": r["id"], "messages": msgs})
        paths[kind] = os.path.join(out_dir, f"probe-{kind}.jsonl")
    for name, rows_of in files.items():  # study workers share these files
        write_jsonl(paths[name], rows_of)
    return paths


def _losses(model, tok, path: str, max_length: int) -> dict:
    """{dialogue id: {turn: (summed NLL, tokens)}} of one probe file."""
    from resure_ds.eval.offline import turn_scores

    out: dict = {}
    for did, t, nll, count in turn_scores(model, tok, path, max_length, overflow="cut"):
        out.setdefault(did, {})[t] = (nll, count)
    return out


def _token_mean(cells) -> float | None:
    cells = list(cells)
    tokens = sum(c for _, c in cells)
    return sum(n for n, _ in cells) / tokens if tokens else None


def probe(model_dir: str, paths: dict, max_length: int) -> dict:
    """Uptake margins per kind and later-turn losses of one exported model (see the module doc)."""
    from resure_ds.eval.offline import load_model

    model, tok = load_model(model_dir)
    clean = _losses(model, tok, paths["clean"], max_length)
    out = {"dialogues": len(clean), "uptake_margin": {}, "later_delta": {}, "later_pairs": {},
           "later_clean": _token_mean(c for d in clean for t, c in clean[d].items() if t > 0),
           "later_turns": sum(t > 0 for d in clean for t in clean[d])}
    for kind in KINDS:
        bad = _losses(model, tok, paths[kind], max_length)
        both = [d for d in clean if 0 in clean[d] and 0 in bad.get(d, {})]
        out["uptake_margin"][kind] = (_token_mean(bad[d][0] for d in both)
                                      - _token_mean(clean[d][0] for d in both))
        same = [(d, t) for d in clean for t in clean[d]
                if t > 0 and bad.get(d, {}).get(t, (0, -1))[1] == clean[d][t][1]]
        after = _token_mean(bad[d][t] for d, t in same)
        out["later_delta"][kind] = None if after is None else after - _token_mean(clean[d][t] for d, t in same)
        out["later_pairs"][kind] = len(same)
    vals = [v for v in out["later_delta"].values() if v is not None]
    out["later_delta_mean"] = sum(vals) / len(vals) if vals else None
    return out
