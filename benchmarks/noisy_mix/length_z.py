"""The paper's z against the length-aware z (stats.length_scaled), side by side on the same training.

SFT on the noisy-mix data (chitchat, one corrupted turn in --noise of the dialogues, every
corruption kind), trained twice with the same seed, data and order: weights are 1 under SFT, so
both runs train the same model step for step, and only the z the statistics give each turn
differs. Prints the AUROC of z against the injected labels (complete turns after warm-up), per
corruption kind, and the share of short turns (at most --short trained tokens) among the most
extreme z (top 5%), for both.

    python benchmarks/noisy_mix/length_z.py [--dialogues 160] [--steps 40] [--noise 0.3] [--tiny]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from benchmarks.noisy_mix.corrupt import make_study_data  # noqa: E402
from benchmarks.noisy_mix.run import PROFILES, detection, read_jsonl, tiny_model, train_one, write_jsonl  # noqa: E402


def turn_lengths(path: str, model_path: str, max_length: int) -> dict:
    """(dialogue id, turn) -> trained tokens, rendered as training renders them."""
    from resure_ds.data.records import read_dialogues
    from resure_ds.data.render import Renderer
    from resure_ds.models import load_tokenizer

    r = Renderer(load_tokenizer(model_path), max_length)
    out = {}
    for ex in r.render_many(list(read_dialogues(path))):
        if ex is not None:
            for t, c in enumerate(np.bincount(ex.turn_ids[ex.turn_ids >= 0])):
                out[(ex.dialogue_id, t)] = int(c)
    return out


def scores(run_dir: str, labels: list[dict], lengths: dict, short: int) -> dict:
    """The study's detection of the labels by z (run.detection), and what the most extreme z hold:
    the shares of short and of corrupted turns among the top 5%."""
    from resure_ds.report.audit import read_audit

    det = detection(run_dir, labels)
    rows = [r for r in read_audit(run_dir).to_pylist() if r["warm"] and not r["partial"] and r["z"] is not None]
    corrupted = {(x["dialogue_id"], x["turn"]) for x in labels}
    top = sorted(rows, key=lambda r: -r["z"])[: max(1, len(rows) // 20)]
    return {"turns": det["turns"], "corrupted": det["corrupted"], "auroc_z": det["auroc_z"],
            "top5pct_short_share": sum(lengths.get((r["dialogue_id"], r["turn"]), 10 ** 9) <= short
                                       for r in top) / len(top),
            "top5pct_corrupted_share": sum((r["dialogue_id"], r["turn"]) in corrupted for r in top) / len(top),
            "per_kind": {k: v["auroc_z"] for k, v in det["per_kind"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dialogues", type=int, default=160)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--short", type=int, default=4, help="a short turn has at most this many trained tokens")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer random model: a dry run of the script")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "noisy_mix", "work", "length_z"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29534")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from resure_ds.models import EMBEDDED, resolve_model_path

    p = dict(PROFILES["quick" if a.tiny else "cpu"])
    model = tiny_model(os.path.join(a.out, "tiny-model")) if a.tiny else resolve_model_path(EMBEDDED)
    data = os.path.join(a.out, f"data-noise{a.noise}")
    make_study_data("chitchat", data, noise=a.noise, early=p["early"], seed=0)
    train = os.path.join(data, "train-subset.jsonl")
    write_jsonl(train, read_jsonl(os.path.join(data, "train.jsonl"))[: a.dialogues])
    labels = read_jsonl(os.path.join(data, "labels.jsonl"))
    lengths = turn_lengths(train, model, p["max_length"])
    res = {}
    for scaled in (False, True):
        run = train_one(f"sft-length_scaled-{str(scaled).lower()}", train, model, p, "sft", a.steps, 0,
                        {"stats.length_scaled": scaled}, os.path.join(a.out, "runs"))
        res["length_scaled" if scaled else "paper"] = scores(run, labels, lengths, a.short)
    res["settings"] = {"dialogues": a.dialogues, "steps": a.steps, "noise": a.noise, "short": a.short,
                       "model": "tiny" if a.tiny else "SmolLM2-135M-Instruct", "max_length": p["max_length"],
                       "micro_batch_size": p["micro_batch_size"], "lr": p["lr"], "min_count": p["min_count"]}
    print(json.dumps(res, indent=1))
    paper, scaled = res["paper"], res["length_scaled"]
    print(f"AUROC of z: paper {paper['auroc_z']:.3f}, length-aware {scaled['auroc_z']:.3f}; short turns among "
          f"the top 5% z: paper {paper['top5pct_short_share']:.0%}, length-aware {scaled['top5pct_short_share']:.0%}")
    for kind in paper["per_kind"]:
        print(f"  {kind:9s} paper {paper['per_kind'][kind]}, length-aware {scaled['per_kind'][kind]}")


if __name__ == "__main__":
    main()
