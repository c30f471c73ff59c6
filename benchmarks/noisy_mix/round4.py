"""The noisy-mix study, round 4: a design that can show the weighting's effect, realistic noise, an oracle.

    python benchmarks/noisy_mix/round4.py --profile quick          # tiny model: the pipeline and schema
    python benchmarks/noisy_mix/round4.py --profile cpu [--worker I/N]   # SmolLM2-135M, 2-core CPU
    python benchmarks/noisy_mix/round4.py --profile gpu            # larger sizes and sequences

Design (benchmarks/noisy_mix/README.md, round 4): per seed, a fresh sample of `size` training
dialogues and a fresh choice of which `noise` share of them gets one corrupted reply (realistic.py:
weak, generic, offtopic, repeat, truncate, random), the corrupted turn spread over depths so every
bucket's contamination stays near the pooled rate (reported). One epoch. Arms, each on the same
sample and seed:

  sft              plain training on the noisy sample
  resure           the paper's rule with the defaults (z against the bucket's mean and std, tau 1.5)
  resure_mad       z against the bucket's median and MAD (stats.scale=mad)
  resure_quantile  the threshold at each bucket's (1 - 0.2) loss quantile (resure.threshold=quantile)
  loss_truncation  weight 0 above the running 80% loss quantile (drop_fraction 0.2)
  prefilter        the base model scores every turn; the dialogues holding the top 20% are dropped;
                   one epoch over what is kept
  oracle           exactly the corrupted dialogues dropped; one epoch over the rest (the most any
                   weighting of dialogues could reach)
  clean            the same sample without its corruptions (SFT on clean data)
  resure_excess    reference-aware statistics (stats.signals=[excess]): z of the excess loss, the turn's
                   loss minus the base model's, with the paper's fixed tau (added after the first 32
                   runs: the detection table showed the excess loss ranks weak, generic and repeat
                   replies where the raw loss cannot)
  resure_excess_quantile  the same with the threshold at each bucket's 80% quantile (budget 0.2)
  dft              Dynamic Fine-Tuning (train.method=dft, Wu et al. 2025): each token's loss scaled by
                   its detached probability, the baseline LLaMA-Factory, TRL and ms-swift ship

Every filter or weighting gets the same 20% budget, fixed before the results. Outcomes: clean test
loss; the uptake margin per kind on clean test contexts (loss of a corrupted first reply minus the
genuine one: a model that learned the noise lowers it); what the model writes for held-out
contexts (greedy: length, repeated 3-grams, canned phrases); detection AUROC per kind of the raw
turn loss, z (std), z (mad), the base model's loss and the excess loss (loss minus the base
model's), on the training turns. Differences are paired by seed against sft, with 95% t-intervals;
the share of the oracle's gain over sft that each arm recovers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks.noisy_mix.corrupt import split_of, write_jsonl  # noqa: E402
from benchmarks.noisy_mix.metrics import auroc  # noqa: E402
from benchmarks.noisy_mix.realistic import (KINDS, choose, contamination, corrupt,  # noqa: E402
                                            generation_measures)
from benchmarks.noisy_mix.run import read_jsonl, tiny_model, train_one  # noqa: E402

BUDGET = 0.2  # the share every filter or weighting may act on (prefilter, truncation, quantile)
ARMS = {  # arm -> (method, overrides, data: noisy | clean | oracle | prefilter)
    "sft": ("sft", {}, "noisy"),
    "resure": ("resure", {}, "noisy"),
    "resure_mad": ("resure", {"stats.scale": "mad"}, "noisy"),
    "resure_quantile": ("resure", {"resure.threshold": "quantile", "resure.down_share": BUDGET}, "noisy"),
    "loss_truncation": ("loss_truncation", {"loss_truncation.drop_fraction": BUDGET}, "noisy"),
    "prefilter": ("sft", {}, "prefilter"),
    "oracle": ("sft", {}, "oracle"),
    "clean": ("sft", {}, "clean"),
    "resure_excess": ("resure", {"stats.signals": "[excess]"}, "noisy"),
    "resure_excess_quantile": ("resure", {"stats.signals": "[excess]", "resure.threshold": "quantile",
                                          "resure.down_share": BUDGET}, "noisy"),
    "dft": ("dft", {}, "noisy"),
}
PROFILES = {
    "quick": dict(model="tiny", max_length=64, micro_batch_size=8, size=32, lr=1e-3, min_count=4, seeds=[0, 1],
                  main_noise=0.3, other_noises={"0.0": ["sft", "resure_excess_quantile"]}, other_seeds=[0],
                  eval_limit=16, probe_limit=8, gen_limit=3, gen_tokens=12),
    "cpu": dict(model="smollm2", max_length=128, micro_batch_size=4, size=64, lr=1e-4, min_count=8,
                seeds=[0, 1, 2, 3, 4], main_noise=0.3,
                other_noises={"0.0": ["sft", "resure", "resure_excess_quantile"],
                              "0.15": ["sft", "oracle", "resure", "resure_excess_quantile"]}, other_seeds=[0, 1, 2],
                eval_limit=64, probe_limit=24, gen_limit=8, gen_tokens=32),
    "gpu": dict(model="smollm2", max_length=512, micro_batch_size=16, size=1024, lr=1e-4, min_count=32,
                seeds=[0, 1, 2, 3, 4], main_noise=0.3,
                other_noises={"0.0": ["resure", "resure_mad", "resure_quantile"], "0.15": list(ARMS)},
                eval_limit=256, probe_limit=128, gen_limit=32, gen_tokens=64),
}
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 29: 2.045}


def t_interval(xs: list[float]) -> dict:
    """Mean and its 95% t-interval (n - 1 degrees of freedom)."""
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "lo": None, "hi": None}
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "lo": None, "hi": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    t = T975.get(n - 1, T975[max(k for k in T975 if k <= n - 1)])
    return {"n": n, "mean": mean, "lo": mean - t * sd / math.sqrt(n), "hi": mean + t * sd / math.sqrt(n)}


# -- data ----------------------------------------------------------------------------------------
def load_splits(source: str) -> dict:
    from resure_ds.data.records import read_dialogues

    out = {"train": [], "val": [], "test": []}
    for d in read_dialogues(source, skip_invalid=True):
        out[split_of(d.dialogue_id)].append({"id": d.dialogue_id, "messages": d.messages})
    return out


class Generator:
    """Greedy replies of a model folder for given contexts (the weak kind, the generation measures)."""

    def __init__(self, model, tok, max_new: int):
        self.model, self.tok, self.max_new = model, tok, max_new

    def reply(self, messages: list[dict]) -> str:
        import torch

        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
        with torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=self.max_new, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        return self.tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def seed_data(splits: dict, p: dict, noise: float, seed: int, base: Generator, out: str) -> dict:
    """This seed's sample, corruptions (labels), and the arms' training files (cached in out)."""
    folder = os.path.join(out, "data", f"n{noise}-seed{seed}")
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            return json.load(f)
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(f"round4-{seed}")
    train = [r for r in splits["train"] if any(m["role"] == "assistant" for m in r["messages"])]
    sample = rng.sample(train, p["size"])
    pool = [m["content"] for r in train for m in r["messages"] if m["role"] == "assistant"]
    whole = whole_turns(sample, base.tok, p["max_length"])
    chosen = choose(sample, noise, random.Random(f"round4-choose-{seed}"), whole)
    noisy, labels = [json.loads(json.dumps(r)) for r in sample], []
    krng = random.Random(f"round4-kind-{seed}")
    for k, (i, t) in enumerate(chosen):
        msgs = noisy[i]["messages"]
        j = [x for x, m in enumerate(msgs) if m["role"] == "assistant"][t]
        kind = KINDS[(k + seed) % len(KINDS)]
        weak = base.reply(msgs[:j]) if kind == "weak" else None
        msgs[j] = {"role": "assistant", "content": corrupt(kind, msgs, j, pool, krng, weak)}
        labels.append({"dialogue_id": noisy[i]["id"], "turn": t, "kind": kind})
    bad = {x["dialogue_id"] for x in labels}
    files = {"noisy": noisy, "clean": sample, "oracle": [r for r in noisy if r["id"] not in bad]}
    paths = {}
    for name, rows in files.items():
        paths[name] = os.path.join(folder, f"{name}.jsonl")
        write_jsonl(paths[name], rows)
    meta = {"paths": paths, "labels": labels, "size": len(sample), "corrupted": len(labels),
            "contamination_per_bucket": contamination(whole, chosen), "whole_turns": sum(whole)}
    write_jsonl(os.path.join(folder, "labels.jsonl"), labels)
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    return meta


def whole_turns(rows: list[dict], tokenizer, max_length: int) -> list[int]:
    """Per row, how many of its assistant turns train whole within max_length (the rest are cut)."""
    from resure_ds.data.records import Dialogue
    from resure_ds.data.render import Renderer

    r = Renderer(tokenizer, max_length)
    out = []
    for row in rows:
        ex = r.render(Dialogue(row["id"], row["messages"], "study"))
        out.append(0 if ex is None else int((~ex.partial).sum()))
    return out


def base_turn_losses(model_dir: str, path: str, max_length: int) -> dict:
    """(dialogue id, turn) -> the base model's mean token loss on that turn."""
    from resure_ds.eval.offline import load_model, turn_scores

    model, tok = load_model(model_dir)
    return {(d, t): nll / c for d, t, nll, c in turn_scores(model, tok, path, max_length, overflow="cut")}


def prefilter_file(meta: dict, base_losses: dict, folder: str) -> str:
    """The prefilter: drop the dialogues holding the top BUDGET share of the base model's turn losses."""
    path = os.path.join(folder, "prefilter.jsonl")
    if not os.path.exists(path):
        ranked = sorted(base_losses.items(), key=lambda kv: -kv[1])
        drop = {d for (d, _), _ in ranked[: int(round(BUDGET * len(ranked)))]}
        write_jsonl(path, [r for r in read_jsonl(meta["paths"]["noisy"]) if r["id"] not in drop])
    return path


# -- outcomes ---------------------------------------------------------------------------------------
def probe_files(test: list[dict], pool: list[str], base: Generator, out: str) -> dict:
    """probe-clean.jsonl and probe-<kind>.jsonl: each test dialogue's first reply, genuine or corrupted."""
    paths = {k: os.path.join(out, f"probe4-{k}.jsonl") for k in ("clean", *KINDS)}
    if all(os.path.exists(x) for x in paths.values()):
        return paths
    rows = [r for r in test if any(m["role"] == "assistant" for m in r["messages"])]
    write_jsonl(paths["clean"], rows)
    for kind in KINDS:
        rng, got = random.Random(f"probe4-{kind}"), []
        for r in rows:
            msgs = [dict(m) for m in r["messages"]]
            j = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            weak = base.reply(msgs[:j]) if kind == "weak" else None
            msgs[j] = {"role": "assistant", "content": corrupt(kind, msgs, j, pool, rng, weak)}
            got.append({"id": r["id"], "messages": msgs})
        write_jsonl(paths[kind], got)
    return paths


def margins(model, tok, paths: dict, max_length: int) -> dict:
    """Uptake margin per kind: token-mean loss of the corrupted first reply minus the genuine one."""
    from resure_ds.eval.offline import turn_scores

    def first(path):
        return {d: (nll, c) for d, t, nll, c in turn_scores(model, tok, path, max_length, overflow="cut") if t == 0}

    clean = first(paths["clean"])
    out = {}
    for kind in KINDS:
        bad = first(paths[kind])
        both = [d for d in clean if d in bad]
        if both:
            out[kind] = (sum(bad[d][0] for d in both) / sum(bad[d][1] for d in both)
                         - sum(clean[d][0] for d in both) / sum(clean[d][1] for d in both))
    return out


def outcomes(model_dir: str, probe: dict, test: list[dict], p: dict, out: str) -> dict:
    """Clean test loss, uptake margins and generation measures of one model folder (loaded once)."""
    from resure_ds.eval.offline import evaluate, load_model

    model, tok = load_model(model_dir)
    return {"test": evaluate(model, tok, os.path.join(out, "test-eval.jsonl"), p["max_length"], overflow="cut"),
            "margins": margins(model, tok, probe, p["max_length"]),
            "generation": generations(Generator(model, tok, p["gen_tokens"]), test, p)}


def generations(g: Generator, test: list[dict], p: dict) -> dict:
    contexts = [r["messages"][:next(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")]
                for r in test if any(m["role"] == "assistant" for m in r["messages"])][: p["gen_limit"]]
    return generation_measures([g.reply(c) for c in contexts])


def scores_auroc(audit_rows: list[dict], labels: list[dict], base_losses: dict, field: str) -> dict:
    """AUROC per kind (and all) of a per-turn score against the injected labels, on complete turns."""
    kinds = {(x["dialogue_id"], x["turn"]): x["kind"] for x in labels}
    rows = [r for r in audit_rows if not r["partial"]]
    seen = {}
    for r in rows:  # one epoch: a turn is seen once; keep the first visit
        seen.setdefault((r["dialogue_id"], r["turn"]), r)

    def score(r):
        key = (r["dialogue_id"], r["turn"])
        if field == "base":
            return base_losses.get(key)
        if field == "excess":
            return None if key not in base_losses else r["loss"] - base_losses[key]
        return r[field]

    pairs = [(score(r), kinds.get(k)) for k, r in seen.items()]
    pairs = [(s, k) for s, k in pairs if s is not None]
    out = {"all": auroc([s for s, _ in pairs], [k is not None for _, k in pairs])}
    for kind in KINDS:
        sel = [(s, k) for s, k in pairs if k in (None, kind)]
        out[kind] = auroc([s for s, _ in sel], [k == kind for _, k in sel]) if any(k == kind for _, k in sel) else None
    return out


def weights_on_corrupted(audit_rows: list[dict], labels: list[dict]) -> dict:
    kinds = {(x["dialogue_id"], x["turn"]) for x in labels}
    w_bad = [r["weight"] for r in audit_rows if (r["dialogue_id"], r["turn"]) in kinds]
    w_ok = [r["weight"] for r in audit_rows if (r["dialogue_id"], r["turn"]) not in kinds]
    y = [(r["dialogue_id"], r["turn"]) in kinds for r in audit_rows]
    return {"mean_w_corrupted": sum(w_bad) / len(w_bad) if w_bad else None,
            "mean_w_clean": sum(w_ok) / len(w_ok) if w_ok else None,
            "auroc_1_minus_w": auroc([1 - r["weight"] for r in audit_rows], y)}


# -- the grid -----------------------------------------------------------------------------------------
def plan(p: dict) -> list[dict]:
    runs = [dict(noise=p["main_noise"], arm=a, seed=s) for s in p["seeds"] for a in ARMS]
    runs += [dict(noise=float(n), arm=a, seed=s) for n, arms in p["other_noises"].items()
             for s in p.get("other_seeds", p["seeds"]) for a in arms]
    return runs


def run_name(spec: dict) -> str:
    return f"n{spec['noise']}-{spec['arm']}-seed{spec['seed']}"


def one_run(spec: dict, p: dict, model: str, meta: dict, base_losses: dict, probe: dict, test_rows: list,
            out: str) -> dict:
    from resure_ds.report.audit import read_audit

    method, extra, data = ARMS[spec["arm"]]
    folder = os.path.dirname(meta["paths"]["noisy"])
    path = prefilter_file(meta, base_losses, folder) if data == "prefilter" else meta["paths"][data]
    n_rows = len(read_jsonl(path))
    steps = max(1, math.ceil(n_rows / p["micro_batch_size"]))  # one epoch over what the arm trains on
    run_dir = train_one(run_name(spec), path, model, p, method, steps, spec["seed"], extra, os.path.join(out, "runs"))
    export = os.path.join(run_dir, "export")
    audit = read_audit(run_dir).to_pylist()
    res = {**spec, "name": run_name(spec), "train_dialogues": n_rows, "steps": steps,
           **outcomes(export, probe, test_rows, p, out)}
    if data == "noisy":
        res["weights"] = weights_on_corrupted(audit, meta["labels"])
        if spec["arm"] in ("sft", "resure_mad", "resure_excess"):  # sft's audit: raw loss, z (std); the others their z
            res["auroc"] = {f: scores_auroc(audit, meta["labels"], base_losses, f)
                            for f in (("loss", "z", "base", "excess") if spec["arm"] == "sft" else ("z",))}
    return res


def summarise(results: list[dict], base: dict, p: dict) -> dict:
    """Per noise and arm: outcomes over seeds; paired differences from sft (95% t); share of the
    oracle's gain recovered (on the seed means of the test loss and of each margin)."""
    out = {}
    for noise in sorted({r["noise"] for r in results}):
        at = [r for r in results if r["noise"] == noise]
        sft = {r["seed"]: r for r in at if r["arm"] == "sft"}
        cell = {}
        for arm in ARMS:
            runs = {r["seed"]: r for r in at if r["arm"] == arm}
            if not runs:
                continue
            seeds = sorted(s for s in runs if s in sft)

            def metric(r, m):
                if m == "test_loss":
                    return r["test"]["loss"]
                if m.startswith("margin_"):
                    return r["margins"].get(m[7:])
                return r["generation"][m]

            names = ["test_loss", *(f"margin_{k}" for k in KINDS), "mean_words", "repeated_3gram_rate",
                     "generic_rate"]
            c = {"n": len(runs), "mean": {}, "minus_sft": {}}
            for m in names:
                vals = [metric(r, m) for r in runs.values() if metric(r, m) is not None]
                c["mean"][m] = sum(vals) / len(vals) if vals else None
                c["minus_sft"][m] = t_interval([metric(runs[s], m) - metric(sft[s], m) for s in seeds
                                                if metric(runs[s], m) is not None and metric(sft[s], m) is not None])
            ref = {r["seed"]: r for r in at if r["arm"] == "resure"}  # the default, for the pre-stated rule
            c["test_loss_minus_resure"] = t_interval([runs[s]["test"]["loss"] - ref[s]["test"]["loss"]
                                                      for s in sorted(runs) if s in ref])
            ws = [r["weights"] for r in runs.values() if r.get("weights")]
            if ws:
                c["weights"] = {k: (sum(v) / len(v) if (v := [w[k] for w in ws if w[k] is not None]) else None)
                                for k in ws[0]}
            cell[arm] = c
        if "oracle" in cell and "sft" in cell:
            for arm, c in cell.items():
                c["oracle_gap_recovered"] = {}
                for m in ["test_loss", *(f"margin_{k}" for k in KINDS)]:
                    o, s, v = cell["oracle"]["mean"].get(m), cell["sft"]["mean"].get(m), c["mean"].get(m)
                    d = cell["oracle"]["minus_sft"][m]
                    # a share of a gap the seeds cannot resolve (its interval holds zero) is not a number
                    resolved = d["lo"] is not None and (d["lo"] > 0 or d["hi"] < 0)
                    if None not in (o, s, v) and abs(o - s) > 1e-12:
                        c["oracle_gap_recovered"][m] = (v - s) / (o - s) if resolved else None
        det = {}
        for arm in ("sft", "resure_mad", "resure_excess"):
            runs = [r["auroc"] for r in at if r["arm"] == arm and r.get("auroc")]
            for f in (runs[0] if runs else {}):
                z = {"sft": "z (std)", "resure_mad": "z (mad)", "resure_excess": "z of the excess loss (in training)"}
                name = {"loss": "raw loss", "z": z[arm], "base": "base-model loss", "excess": "excess loss"}[f]
                det[name] = {k: t_interval([x[f][k] for x in runs if x[f].get(k) is not None])
                             for k in ("all", *KINDS)}
        contam = [r["contamination_per_bucket"] for r in base.get("seed_meta", {}).get(str(noise), [])]
        out[str(noise)] = {"arms": cell, "detection": det, "contamination_per_bucket": contam}
    return out


def write_markdown(out: str, summary: dict, base: dict, p: dict) -> None:
    f3 = lambda v, d=4: "n/a" if v is None else f"{v:+.{d}f}"  # noqa: E731
    ci = lambda s, d=4: "n/a" if s["mean"] is None else (  # noqa: E731
        f"{s['mean']:+.{d}f}" + ("" if s["lo"] is None else f" [{s['lo']:+.{d}f}, {s['hi']:+.{d}f}]"))
    lines = []
    for noise, s in summary.items():
        if not s:
            continue
        lines += [f"### Noise {float(noise):.0%}", ""]
        if s.get("contamination_per_bucket"):
            lines += ["Corrupted share of the training turns per depth bucket (seeds): "
                      + "; ".join(", ".join(f"{x:.2f}" for x in c) for c in s["contamination_per_bucket"]), ""]
        lines += ["| arm | n | test loss | minus sft [95% t] | oracle gap recovered | "
                  + " | ".join(f"margin {k} minus sft" for k in KINDS) + " | w corrupted / clean |",
                  "| --- | --- | --- | --- | --- |" + " --- |" * len(KINDS) + " --- |"]
        for arm, c in s["arms"].items():
            w = c.get("weights")
            lines.append(f"| {arm} | {c['n']} | {c['mean']['test_loss']:.4f} | {ci(c['minus_sft']['test_loss'])} | "
                         f"{f3(c.get('oracle_gap_recovered', {}).get('test_loss'), 2)} | "
                         + " | ".join(ci(c['minus_sft'][f'margin_{k}'], 3) for k in KINDS)
                         + (f" | {w['mean_w_corrupted']:.3f} / {w['mean_w_clean']:.3f} |" if w and
                            w.get("mean_w_corrupted") is not None else " | |"))
        if any(c.get("oracle_gap_recovered") for c in s["arms"].values()):
            lines += ["", "The pre-stated rule's comparison (clean test loss minus the default `resure`, paired, 95% t) "
                      "and the share of the oracle's margin gain over sft that each arm recovers, per kind (seed "
                      "means; 1.00 = as much as dropping exactly the corrupted dialogues):", "",
                      "| arm | test loss minus resure [95% t] | " + " | ".join(f"{k} gap recovered" for k in KINDS) + " |",
                      "| --- | --- |" + " --- |" * len(KINDS)]
            for arm, c in s["arms"].items():
                gap = c.get("oracle_gap_recovered", {})
                lines.append(f"| {arm} | {ci(c['test_loss_minus_resure'])} | "
                             + " | ".join(f3(gap.get(f'margin_{k}'), 2) for k in KINDS) + " |")
        lines += ["", "What the models write (greedy, held-out contexts; seed means):", "",
                  "| arm | words | repeated 3-grams | canned phrases |", "| --- | --- | --- | --- |"]
        g = base["generation"]
        lines.append(f"| base model | {g['mean_words']:.1f} | {g['repeated_3gram_rate']:.3f} | {g['generic_rate']:.3f} |")
        for arm, c in s["arms"].items():
            m = c["mean"]
            lines.append(f"| {arm} | {m['mean_words']:.1f} | {m['repeated_3gram_rate']:.3f} | {m['generic_rate']:.3f} |")
        if any(d["all"]["n"] for d in s["detection"].values()):
            lines += ["", "Detection: AUROC of each score for the corrupted turns, per kind (mean [95% t] over seeds):",
                      "", "| score | all | " + " | ".join(KINDS) + " |", "| --- | --- |" + " --- |" * len(KINDS)]
            for name, d in s["detection"].items():
                lines.append(f"| {name} | {ci(d['all'], 3)} | " + " | ".join(ci(d[k], 3) for k in KINDS) + " |")
        lines.append("")
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def write_plots(out: str, summary: dict) -> list[str]:
    """Per noise rate, one figure: each arm's paired difference from sft in clean test loss (95% t
    bars), and its mean difference in uptake margin per kind (above zero: learned that noise less)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for noise, s in summary.items():
        arms = [a for a in s.get("arms", {}) if a != "sft"]
        if not arms:
            continue
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 0.45 * len(arms) + 2), gridspec_kw={"width_ratios": [1, 1.4]})
        for i, a in enumerate(arms):
            d = s["arms"][a]["minus_sft"]["test_loss"]
            if d["mean"] is None:
                continue
            err = None if d["lo"] is None else [[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]]
            ax.errorbar(d["mean"], i, xerr=err, fmt="o", color="C0", capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(arms)), arms)
        ax.invert_yaxis()
        ax.set_xlabel("clean test loss minus sft (nats; 95% t, paired by seed)")
        grid = [[(s["arms"][a]["minus_sft"].get(f"margin_{k}") or {}).get("mean") for k in KINDS] for a in arms]
        vals = [[float("nan") if v is None else v for v in row] for row in grid]
        lim = max([abs(v) for row in vals for v in row if v == v] or [1.0])
        im = bx.imshow(vals, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        for i, row in enumerate(vals):
            for j, v in enumerate(row):
                if v == v:
                    bx.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=8)
        bx.set_xticks(range(len(KINDS)), KINDS)
        bx.set_yticks(range(len(arms)), arms)
        bx.set_title("uptake margin minus sft (nats; > 0: learned that noise less)", fontsize=9)
        fig.colorbar(im, ax=bx, fraction=0.03)
        fig.suptitle(f"noisy-mix round 4, noise {float(noise):.0%}")
        fig.tight_layout()
        path = os.path.join(out, f"round4-noise{float(noise):.2f}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--data", default="chitchat")
    ap.add_argument("--out", default=None, help="default: benchmarks/noisy_mix/work/round4-<profile>")
    ap.add_argument("--worker", default=None, metavar="I/N", help="only runs i, i+N, ... of the grid (then run "
                    "without --worker to write the tables)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no run after this many seconds")
    ap.add_argument("--only", default=None, help="comma-separated arms: run only these (the tables still read "
                    "every finished run)")
    a = ap.parse_args()
    p = PROFILES[a.profile]
    out = os.path.abspath(a.out or os.path.join(ROOT, "benchmarks", "noisy_mix", "work", f"round4-{a.profile}"))
    os.makedirs(out, exist_ok=True)
    worker = tuple(int(x) for x in a.worker.split("/")) if a.worker else None
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(int(os.environ.get("MASTER_PORT", "29633")) + (worker[0] if worker else 0))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from resure_ds.models import EMBEDDED, resolve_model_path

    model = tiny_model(os.path.join(out, "tiny-model")) if p["model"] == "tiny" else resolve_model_path(EMBEDDED)
    t0 = time.time()
    splits = load_splits(a.data)
    test = splits["test"]
    write_jsonl(os.path.join(out, "test-eval.jsonl"), test[: p["eval_limit"]])
    from resure_ds.eval.offline import load_model

    gen = Generator(*load_model(model), p["gen_tokens"])
    pool = [m["content"] for r in splits["train"] for m in r["messages"] if m["role"] == "assistant"]
    probe = probe_files(test[: p["probe_limit"]], pool, gen, out)
    base_path = os.path.join(out, "base.json")
    if not os.path.exists(base_path):
        base = outcomes(model, probe, test, p, out)
        with open(base_path, "w", encoding="utf-8") as f:
            json.dump(base, f)
    with open(base_path, encoding="utf-8") as f:
        base = json.load(f)
    specs = plan(p)
    if a.only:
        specs = [x for x in specs if x["arm"] in a.only.split(",")]
    if worker:
        specs = specs[worker[0]::worker[1]]
    log = os.path.join(out, f"runs-{worker[0]}of{worker[1]}.jsonl" if worker else "runs.jsonl")
    done = {}
    for fname in sorted(os.listdir(out)):
        if fname.startswith("runs") and fname.endswith(".jsonl"):
            done.update({r["name"]: r for r in read_jsonl(os.path.join(out, fname))})
    results, metas, losses = [], {}, {}
    for spec in specs:
        key = (spec["noise"], spec["seed"])
        if key not in metas:
            metas[key] = seed_data(splits, p, spec["noise"], spec["seed"], gen, out)
        name = run_name(spec)
        if name in done:
            results.append(done[name])
            continue
        if a.budget_s is not None and time.time() - t0 > a.budget_s:
            continue
        if key not in losses:
            losses[key] = base_turn_losses(model, metas[key]["paths"]["noisy"], p["max_length"])
        res = one_run(spec, p, model, metas[key], losses[key], probe, test, out)
        results.append(res)
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(res) + "\n")
        print(f"[round4] {name}: test loss {res['test']['loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    if worker:
        return
    base["seed_meta"] = {str(n): [metas[(n, s)] for s in p["seeds"] if (n, s) in metas]
                         for n in sorted({k[0] for k in metas})}
    summary = summarise(results, base, p)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"profile": a.profile, "settings": p, "budget": BUDGET, "arms": {k: list(v) for k, v in ARMS.items()},
                   "base": base, "summary": summary, "runs": results, "runs_left": len(specs) - len(results),
                   "wall_s": time.time() - t0}, f, indent=1)
    write_markdown(out, summary, base, p)
    write_plots(out, summary)
    print(f"[round4] {len(results)} of {len(specs)} runs -> {out}/results.md", flush=True)
    from resure_ds.train import cleanup

    cleanup()


if __name__ == "__main__":
    main()
