"""The noisy-mix study, round 5: what the model says, against a turn-level oracle, on noise it never saw.

    python benchmarks/noisy_mix/round5.py --profile quick                 # tiny model: pipeline and schema
    OMP_NUM_THREADS=1 python benchmarks/noisy_mix/round5.py --profile cpu --worker 0/2 &
    OMP_NUM_THREADS=1 python benchmarks/noisy_mix/round5.py --profile cpu --worker 1/2
    python benchmarks/noisy_mix/round5.py --profile cpu --budget-s 0     # the tables, once the 30% cell is complete

The design, the outcomes, the success rule and the rule that picks defaults are in
benchmarks/noisy_mix/README.md (round 5), written before the first run. In short: per seed, a fresh
sample of `size` training dialogues as a mixture of six sources (two clean, four noisy: canned,
weak, degenerate, offtopic, 30% of the dialogues; noise5.py), half the replies of each noisy
dialogue corrupted; one epoch; the arms of ARMS on the same sample; outcomes on held-out dialogues:
the noise-emission rate of sampled replies (the detector, fit before any run), the two-choice
preference for held-out noise, the clean NLL.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks.noisy_mix import keep5  # noqa: E402
from benchmarks.noisy_mix.corrupt import write_jsonl  # noqa: E402
from benchmarks.noisy_mix.metrics import auroc  # noqa: E402
from benchmarks.noisy_mix.noise5 import (CLASSES, KINDS, Detector, cutoff_reply, loop_reply,  # noqa: E402
                                         make_noise, precision_recall_per_class)
from benchmarks.noisy_mix.round4 import load_splits, whole_turns  # noqa: E402
from benchmarks.noisy_mix.run import read_jsonl, tiny_model, train_one  # noqa: E402
from benchmarks.noisy_mix.stats5 import fieller, holm, paired  # noqa: E402

BUDGET = 0.2  # the share every filter or weighting may act on
SOURCES = {"chat_a": 0.35, "chat_b": 0.35, "canned": 0.075, "weak": 0.075, "degenerate": 0.075, "offtopic": 0.075}
CORRUPT_P = 0.5  # each reply of a noisy source's dialogue is corrupted with this probability (at least one)
# oracle_turn's and offline_filter's masked replies: a data weight, not train: false, so every row keeps a
# trained token (a dialogue whose replies were all masked would otherwise leave the epoch, and the run
# would repeat rows to fill its steps) and the step's token count N is sft's; their gradient is 1e-6 of it
MASKED = 1e-6
SHARE_ALARM = 10.0  # an adaptive mixture's final share above this multiple of its configured share is named
QUANTILE = {"resure.threshold": "quantile", "resure.down_share": BUDGET}
TWO = {"stats.signals": "[loss,excess]", "resure.two_sided": "true", "resure.threshold": "quantile",
       "resure.weight_fn": "hard", "resure.down_share": BUDGET / 2, "stats.decay": 0.98}
ARMS = {  # arm -> (method, overrides, training files)
    "sft": ("sft", {}, "noisy"),
    "oracle_turn": ("sft", {}, "oracle_turn"),
    "clean": ("sft", {}, "clean"),
    "resure": ("resure", {}, "noisy"),
    "loss_truncation": ("loss_truncation", {"loss_truncation.drop_fraction": BUDGET}, "noisy"),
    "offline_filter": ("sft", {}, "offline_filter"),
    "excess_quantile": ("resure", {"stats.signals": "[excess]", **QUANTILE}, "noisy"),
    "excess_quantile_hard": ("resure", {"stats.signals": "[excess]", **QUANTILE, "resure.weight_fn": "hard"}, "noisy"),
    "two_signals": ("resure", TWO, "noisy"),
    "two_signals_adaptive": ("resure", {**TWO, "data.mixture": "adaptive"}, "noisy"),
}
RULES = ("resure", "loss_truncation", "excess_quantile", "excess_quantile_hard", "two_signals",
         "two_signals_adaptive")  # online rules: the candidates of the success rule are the last four
CANDIDATES = ("excess_quantile", "excess_quantile_hard", "two_signals", "two_signals_adaptive")
PROBE_KINDS = ("canned", "weak", "loop", "cutoff", "offtopic")
PROFILES = {
    "quick": dict(model="tiny", max_length=96, micro_batch_size=8, size=48, lr=1e-3, min_count=4, seeds=[0, 1],
                  noises={"0.3": list(ARMS), "0.0": ["sft", "two_signals", "two_signals_adaptive"]}, contexts=16, gen_tokens=8,
                  probe_pairs=6, detector_pairs=60, eval_dialogues=24, eval_length=128),
    "cpu": dict(model="smollm2", max_length=128, micro_batch_size=4, size=256, lr=1e-4, min_count=8,
                seeds=list(range(8)), noises={"0.3": list(ARMS), "0.0": ["sft", *CANDIDATES]}, contexts=400,
                gen_tokens=40, probe_pairs=50, detector_pairs=600, eval_dialogues=400, eval_length=192,
                native_matmul={"0.3": [0, 1]}),  # matmul_of
    # gpu: every candidate planned; benchmarks/gpu/study.sh runs sft, oracle_turn and one rule (--only).
    # 3,072 dialogues: chitchat's train split holds 3,218
    "gpu": dict(model="smollm2", max_length=512, micro_batch_size=16, size=3072, lr=1e-4, min_count=32,
                seeds=list(range(5)), noises={"0.3": ["sft", "oracle_turn", *CANDIDATES],
                                              "0.0": ["sft", *CANDIDATES]}, contexts=400,
                gen_tokens=64, probe_pairs=100, detector_pairs=600, eval_dialogues=400, eval_length=512),
}
TEMPERATURE = 0.7
# the profiles whose tables judge the success rule (quick: its pipeline); the gpu profile replicates sft,
# oracle_turn and one rule on a larger scale and decides nothing, so its tables are not held back
DECIDING = ("quick", "cpu")


# -- held-out material, made once before any run ------------------------------------------------------
def assistant_positions(msgs: list[dict]) -> list[int]:
    return [i for i, m in enumerate(msgs) if m["role"] == "assistant"]


def chat_ids(tok, msgs: list[dict], generation_prompt: bool = False) -> list[int]:
    """The token ids of the chat template's rendering of msgs."""
    text = tok.apply_chat_template(msgs, add_generation_prompt=generation_prompt, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def user_before(msgs: list[dict], j: int) -> str:
    return next((m["content"] for m in reversed(msgs[:j]) if m["role"] == "user"), "")


def detector_data(rows: list[dict], half: str, rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """(user message, reply, class) pairs: n human replies of `rows` and n of each noise class from `half`."""
    pool = [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"]
    cands = [(r["messages"], j) for r in rows for j in assistant_positions(r["messages"]) if j > 0]
    rng.shuffle(cands)
    out = []
    makers = {"human": lambda ms, j: ms[j]["content"],
              "canned": lambda ms, j: make_noise("canned", ms, j, half, pool, rng),
              "weak": lambda ms, j: make_noise("weak", ms, j, half, pool, rng),
              "loop": lambda ms, j: loop_reply(ms[j]["content"], rng)}
    for k, cls in enumerate(CLASSES):
        for ms, j in cands[k * n:(k + 1) * n]:
            out.append((user_before(ms, j), makers[cls](ms, j), cls))
    return out


def fit_detector(splits: dict, p: dict, out: str) -> tuple[Detector, dict]:
    """Fit once (detector.pt; every later process loads it) on the probe-only noise against
    validation-split human replies; held-out precision and recall on the training halves (never seen
    by it) against test-split human replies."""
    import torch

    train = detector_data(splits["val"], "probe", random.Random("round5-detector-fit"), p["detector_pairs"])
    test = detector_data(splits["test"], "train", random.Random("round5-detector-test"), p["detector_pairs"])
    path = os.path.join(out, "detector.pt")
    det = Detector()
    if os.path.exists(path):
        det.W, det.V, det.b = (torch.load(path)[k] for k in ("W", "V", "b"))
    else:
        det.fit([(c, r) for c, r, _ in train], [lab for _, _, lab in train])
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save({"W": det.W, "V": det.V, "b": det.b}, tmp)
        os.replace(tmp, path)
    pred = det.predict([(c, r) for c, r, _ in test])
    truth = [lab for _, _, lab in test]
    report = {"fit_pairs": len(train), "heldout_pairs": len(test), "per_class": precision_recall_per_class(truth, pred),
              "human_flagged_as": {c: sum(t == "human" and q == c for t, q in zip(truth, pred)) /
                                   max(1, truth.count("human")) for c in CLASSES if c != "human"},
              **det.state()}
    report["primary_kinds"] = [c for c in CLASSES[1:] if (report["per_class"][c]["recall"] or 0) >= 0.5
                               and report["human_flagged_as"][c] <= 0.05]
    tmp = os.path.join(out, f"detector.json.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(out, "detector.json"))
    return det, report


def contexts(test: list[dict], p: dict, tok) -> list[dict]:
    """Held-out generation contexts: the messages before assistant turn t (t = 0-2) of test dialogues,
    at most 96 tokens rendered; a fixed sampling seed each."""
    cands = []
    for r in test:
        for t, j in enumerate(assistant_positions(r["messages"])[:3]):
            msgs = r["messages"][:j]
            if len(chat_ids(tok, msgs, True)) <= 96:
                cands.append({"id": f"{r['id']}#{t}", "messages": msgs, "turn": t})
    random.Random("round5-contexts").shuffle(cands)
    return [{**c, "seed": i} for i, c in enumerate(cands[: p["contexts"]])]


def probe_pairs(test: list[dict], pool: list[str], p: dict, out: str, tok) -> dict:
    """Two-choice pairs on held-out contexts: per kind, files genuine-<kind> and noise-<kind> whose
    last assistant turn is the genuine reply or the probe-only noise (depth 0-2, whole within max_length)."""
    paths = {k: (os.path.join(out, f"probe5-genuine-{k}.jsonl"), os.path.join(out, f"probe5-noise-{k}.jsonl"))
             for k in PROBE_KINDS}
    if all(os.path.exists(a) and os.path.exists(b) for a, b in paths.values()):
        return paths
    cands = [(r, j) for r in test for j in assistant_positions(r["messages"])[:3]]
    random.Random("round5-probe-pairs").shuffle(cands)
    for kind in PROBE_KINDS:
        rng, good, bad = random.Random(f"round5-probe-{kind}"), [], []
        for r, j in cands:
            if len(good) >= p["probe_pairs"]:
                break
            msgs = r["messages"][:j + 1]
            text = msgs[j]["content"]
            noise = (loop_reply(text, rng) if kind == "loop" else cutoff_reply(text, rng) if kind == "cutoff"
                     else make_noise(kind, msgs, j, "probe", pool, rng))
            if noise.strip() == text.strip():
                continue
            both = [msgs, msgs[:j] + [{"role": "assistant", "content": noise}]]
            if max(len(chat_ids(tok, m)) for m in both) > p["max_length"] - 4:
                continue
            good.append({"id": f"{r['id']}#{j}", "messages": both[0]})
            bad.append({"id": f"{r['id']}#{j}", "messages": both[1]})
        write_jsonl(paths[kind][0], good)
        write_jsonl(paths[kind][1], bad)
    return paths


# -- the training data of one seed ----------------------------------------------------------------------
def seed_data(splits: dict, p: dict, noise: float, seed: int, tok, out: str) -> dict:
    """This seed's sample as six sources, its corruptions (labels) and the arms' training files."""
    folder = os.path.join(out, "data", f"n{noise}-seed{seed}")
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            return json.load(f)
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(f"round5-{noise}-{seed}")
    train = trainable(splits["train"], tok, p, out)
    sample = rng.sample(train, p["size"])
    names, counts = list(SOURCES), [round(p["size"] * s) for s in SOURCES.values()]
    counts[0] += p["size"] - sum(counts)
    source_of = [n for n, c in zip(names, counts) for _ in range(c)]
    whole = whole_turns(sample, tok, p["max_length"])
    pool = [m["content"] for r in train for m in r["messages"] if m["role"] == "assistant"]
    krng = random.Random(f"round5-corrupt-{noise}-{seed}")
    rows = {"noisy": [], "clean": [], "oracle_turn": []}
    labels = []
    for r, src, n_whole in zip(sample, source_of, whole):
        msgs = [dict(m) for m in r["messages"]]
        clean = [dict(m) for m in msgs]
        oracle = [dict(m) for m in msgs]
        pos = assistant_positions(msgs)[:n_whole]
        if noise > 0 and src in KINDS and pos:
            bad = [t for t in range(len(pos)) if krng.random() < CORRUPT_P] or [krng.randrange(len(pos))]
            for t in bad:
                j = pos[t]
                msgs[j] = {"role": "assistant", "content": make_noise(src, msgs, j, "train", pool, krng)}
                oracle[j] = {**msgs[j], "weight": MASKED}
                labels.append({"dialogue_id": r["id"], "turn": t, "kind": src, "source": src})
        for name, m in (("noisy", msgs), ("clean", clean), ("oracle_turn", oracle)):
            rows[name].append((src, {"id": r["id"], "messages": m}))
    files = {name: write_sources(folder, name, got) for name, got in rows.items()}
    meta = {"files": files, "labels": labels, "size": len(sample), "corrupted_turns": len(labels),
            "whole_turns": sum(whole), "sources": dict(zip(names, counts)), "folder": folder}
    write_jsonl(os.path.join(folder, "labels.jsonl"), labels)
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    return meta


def trainable(rows: list[dict], tok, p: dict, out: str) -> list[dict]:
    """The training split's dialogues with at least one reply whole within max_length (cached)."""
    path = os.path.join(out, "trainable.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            keep = set(json.load(f))
    else:
        keep = {r["id"] for r, n in zip(rows, whole_turns(rows, tok, p["max_length"])) if n}
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(sorted(keep), f)
        os.replace(tmp, path)
    return [r for r in rows if r["id"] in keep]


def write_sources(folder: str, variant: str, rows: list[tuple[str, dict]]) -> list[dict]:
    """One JSONL file per source; the mixture entry of each (weight = its size: one epoch draws each
    dialogue once)."""
    out = []
    for name in SOURCES:
        mine = [r for s, r in rows if s == name]
        if not mine:
            continue
        path = os.path.join(folder, f"{variant}-{name}.jsonl")
        write_jsonl(path, mine)
        out.append({"path": path, "name": name, "weight": len(mine)})
    return out


def offline_filter_files(meta: dict, sft_export: str, model: str, p: dict) -> list[dict]:
    """The two-pass offline filter: every training turn scored by the SFT model of the same seed and by
    the base model; the BUDGET share with the highest excess (SFT loss minus base loss) is masked (data
    weight MASKED); the same dialogues otherwise."""
    from resure_ds.eval.offline import load_model, turn_scores

    entries = [e for e in meta["files"]["noisy"]]
    path = os.path.join(meta["folder"], "offline_filter.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)["files"]
    scores = {}
    for tag, folder in (("sft", sft_export), ("base", model)):
        m, tok = load_model(folder)
        for e in entries:
            for d, t, nll, c in turn_scores(m, tok, e["path"], p["max_length"], overflow="cut"):
                scores.setdefault((d, t), {})[tag] = nll / c
    excess = sorted(((v["sft"] - v["base"], k) for k, v in scores.items() if len(v) == 2), reverse=True)
    drop = {k for _, k in excess[: int(round(BUDGET * len(excess)))]}
    files = []
    for e in entries:
        rows = []
        for r in read_jsonl(e["path"]):
            msgs, pos = [dict(m) for m in r["messages"]], assistant_positions(r["messages"])
            for t, j in enumerate(pos):
                if (r["id"], t) in drop:
                    msgs[j]["weight"] = MASKED
            rows.append({"id": r["id"], "messages": msgs})
        head, name = os.path.split(e["path"])
        out = os.path.join(head, name.replace("noisy-", "offline_filter-", 1))
        write_jsonl(out, rows)
        files.append({**e, "path": out})
    labels = {(x["dialogue_id"], x["turn"]) for x in meta["labels"]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"files": files, "dropped": len(drop), "dropped_corrupted": len(drop & labels),
                   "scored": len(excess)}, f)
    return files


# -- outcomes -------------------------------------------------------------------------------------------
def sample_replies(model, tok, ctxs: list[dict], max_new: int, batch: int = 50) -> list[dict]:
    """One sampled reply per context (T=0.7), each context with its own generator seeded by its
    `seed`, so the same context draws the same random numbers in every arm whatever the batching."""
    import torch

    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} - {None}
    out = []
    model.eval()
    for k in range(0, len(ctxs), batch):
        chunk = ctxs[k:k + batch]
        enc = [chat_ids(tok, c["messages"], True) for c in chunk]
        L, B = max(map(len, enc)), len(enc)
        ids = torch.full((B, L), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, L - len(e):], mask[i, L - len(e):] = torch.tensor(e), 1
        dev = next(model.parameters()).device
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        gens = [torch.Generator().manual_seed(1_000_003 * c["seed"] + 7) for c in chunk]
        toks, done, past, cur = [[] for _ in chunk], [False] * B, None, ids
        with torch.no_grad():
            for _ in range(max_new):
                o = model(input_ids=cur, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
                past = o.past_key_values
                probs = torch.softmax(o.logits[:, -1, :].float() / TEMPERATURE, -1).cpu()
                nxt = torch.stack([torch.multinomial(probs[i], 1, generator=gens[i]) for i in range(B)])
                for i in range(B):
                    if not done[i]:
                        t = int(nxt[i])
                        if t in stop:
                            done[i] = True
                        else:
                            toks[i].append(t)
                if all(done):
                    break
                cur, mask = nxt.to(dev), torch.cat([mask, torch.ones((B, 1), dtype=torch.long, device=dev)], 1)
                pos = pos[:, -1:] + 1
        for c, t, d in zip(chunk, toks, done):
            out.append({"id": c["id"], "reply": tok.decode(t, skip_special_tokens=True).strip(), "ended": d})
    return out


def fast(model, dtype: str):
    """The model on a GPU where there is one, in the grid's precision (`grid_dtype`: bf16 where the
    hardware computes it natively, 1.65x faster than fp32 for the same outcomes; every arm is
    measured the same way)."""
    import torch

    return model.to("cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16 if dtype == "bf16" else torch.float32)


def grid_dtype(asked: str, keep: str | None) -> str:
    """The precision every run of the grid trains and samples in: `asked`, with auto resolved for
    this machine, or the kept runs' precision (keep5.py) for a grid that continues: a bf16 grid
    continues on a CPU without bf16 instructions too, its runs computing their products in fp32
    (matmul_of). Asking for another precision than the kept runs' is refused: a pair of arms must
    differ in the arm, not in the precision of the arithmetic."""
    from resure_ds.runtime.engine import native_bf16

    mine = ("bf16" if native_bf16() else "fp32") if asked == "auto" else asked
    used = (keep5.grid_of(keep) or {}).get("dtype") if keep else None
    if used is None or used == mine:
        return mine
    if asked == "auto":  # a bf16 grid continues on any CPU: its runs compute their products in fp32 (matmul_of)
        return used
    raise SystemExit(f"[round5] the runs kept in {keep} trained and sampled in {used}, --dtype asks for {mine}: "
                     f"a grid's runs share one precision (pass --dtype {used}, or --dtype auto)")


def preferences(model, tok, probes: dict, max_length: int) -> dict:
    """Per kind: the share of pairs where the model gives the noise reply a lower token-mean loss than
    the genuine one in the same context (its preference for the noise)."""
    from resure_ds.eval.offline import turn_scores

    def last(path):
        got = {}
        for d, t, nll, c in turn_scores(model, tok, path, max_length, overflow="cut"):
            got[d] = (t, nll / c) if t >= got.get(d, (-1, 0))[0] else got[d]
        return {d: v for d, (_, v) in got.items()}

    out = {}
    for kind, (good, bad) in probes.items():
        g, b = last(good), last(bad)
        both = [d for d in g if d in b]
        out[kind] = sum(b[d] < g[d] for d in both) / len(both) if both else None
    return out


def judge(detector, ctxs: list[dict], replies: list[dict]) -> list[str]:
    """The detector's class of each sampled reply, read with the user's message before it."""
    return detector.predict([(user_before(c["messages"], len(c["messages"])), r["reply"]) for c, r in zip(ctxs, replies)])


def outcomes(model_dir: str, ctx: dict, p: dict, replies_path: str, matmul: str = "native") -> dict:
    """Clean NLL, the noise-emission rates of sampled replies (written to replies_path with the
    detector's class), the two-choice preferences: one model, its bf16 products computed as `matmul`."""
    from resure_ds.runtime import bf16

    with bf16.products(matmul):
        return _outcomes(model_dir, ctx, p, replies_path)


def _outcomes(model_dir: str, ctx: dict, p: dict, replies_path: str) -> dict:
    from resure_ds.eval.offline import evaluate, load_model

    model, tok = load_model(model_dir)
    model = fast(model, p["dtype"])
    # the replies whole within the first eval_length tokens of every held-out dialogue
    clean = evaluate(model, tok, ctx["eval_path"], p["eval_length"], overflow="cut")
    replies = sample_replies(model, tok, ctx["contexts"], p["gen_tokens"])
    pred = judge(ctx["detector"], ctx["contexts"], replies)
    n = max(len(pred), 1)
    emission = {c: sum(x == c for x in pred) / n for c in CLASSES[1:]}
    emission["any"] = sum(x != "human" for x in pred) / n
    with open(replies_path, "w", encoding="utf-8") as f:
        for r, x in zip(replies, pred):
            f.write(json.dumps({**r, "detector": x}) + "\n")
    return {"clean_nll": clean["loss"], "clean_turns": clean["turns"], "emission": emission,
            "capped": sum(not r["ended"] for r in replies) / n,
            "mean_words": sum(len(r["reply"].split()) for r in replies) / n,
            "preference": preferences(model, tok, ctx["probes"], p["max_length"])}


def training_measures(run_dir: str, meta: dict, spec: dict) -> dict:
    """From the audit: the weight mass each rule removed and the share of it on corrupted turns, the
    corrupted turns' mean weight; detection AUROC per signal; the adaptive mixture's final shares."""
    from resure_ds.report.audit import read_audit

    rows = [r for r in read_audit(run_dir).to_pylist() if not r["partial"]]
    bad = {(x["dialogue_id"], x["turn"]): x["kind"] for x in meta["labels"]}
    y = [(r["dialogue_id"], r["turn"]) in bad for r in rows]
    w = [r["weight"] * (1.0 if r.get("source_weight") is None else r["source_weight"]) for r in rows]
    removed = [1 - r["weight"] for r in rows if r["warm"]]
    removed_bad = [1 - r["weight"] for r, b in zip(rows, y) if r["warm"] and b]
    out = {"turns": len(rows), "corrupted": sum(y),
           "removed_share": sum(removed) / len(removed) if removed else None,
           "removed_precision": sum(removed_bad) / sum(removed) if removed and sum(removed) > 0 else None,
           "w_corrupted": _mean([x for x, b in zip(w, y) if b]), "w_clean": _mean([x for x, b in zip(w, y) if not b])}
    if spec["arm"] in ("sft", "two_signals") and any(y):
        scores = {"loss": lambda r: r["loss"],
                  "excess": lambda r: None if r["ref_loss"] is None else r["loss"] - r["ref_loss"],
                  "z_loss": lambda r: r["z_loss"], "z_excess": lambda r: r["z_excess"],
                  "abs_z_loss": lambda r: None if r["z_loss"] is None else abs(r["z_loss"]),
                  "abs_z_excess": lambda r: None if r["z_excess"] is None else abs(r["z_excess"]),
                  "1-w": lambda r: 1 - r["weight"]}
        out["auroc"] = {}
        for name, f in scores.items():
            per = {}
            for kind in (None, *KINDS):
                sel = [(f(r), b) for r, b in zip(rows, y)
                       if f(r) is not None and (kind is None or not b or bad[(r["dialogue_id"], r["turn"])] == kind)]
                per[kind or "all"] = auroc([s for s, _ in sel], [b for _, b in sel]) if sel else None
            out["auroc"][name] = per
    if spec["arm"] == "two_signals_adaptive":
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            last = [json.loads(ln) for ln in f][-1]
        total = sum(meta["sources"].values())
        out["final_share_over_configured"] = {s: last[f"source_share/{s}"] / (n / total)
                                              for s, n in meta["sources"].items() if f"source_share/{s}" in last}
    return out


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


# -- the grid -------------------------------------------------------------------------------------------
def plan(p: dict) -> list[dict]:
    """The 30% cell first, then 0%; within a cell seed by seed, so a seed's sft runs before its offline
    filter (which scores with sft's model)."""
    return [dict(noise=float(n), arm=a, seed=s) for n, arms in p["noises"].items() for s in p["seeds"] for a in arms]


def take_kept(keep: str, out: str, grid: dict, p: dict) -> None:
    """The kept grid's runs into the study folder, and the study folder's into the kept grid (keep5.py),
    once every run of both has been checked against matmul_of: a run made otherwise goes neither way."""
    check_matmul({**made_runs(out), **{n: k["record"] for n, k in keep5.kept_runs(keep).items()}}, plan(p), p)
    restored = keep5.restore(keep, out, grid)
    if restored:
        print(f"[round5] {len(restored)} runs taken from {keep}", flush=True)
    keep5.save(keep, out, grid)  # and the study folder's runs made before --keep


def made_runs(out: str) -> dict:
    """The study folder's finished runs by name; two different records of one run are refused (keep5)."""
    return keep5.records(out)


def run_name(spec: dict) -> str:
    return f"n{spec['noise']}-{spec['arm']}-seed{spec['seed']}"


def one_run(spec: dict, p: dict, model: str, meta: dict, ctx: dict, out: str, done: dict) -> dict:
    method, extra, files = ARMS[spec["arm"]]
    runs = os.path.join(out, "runs")
    if files == "offline_filter":
        sft, again = sft_model(spec, p, model, meta, runs, done)
        mixture = offline_filter_files(meta, sft, model, p)
    else:
        mixture = meta["files"][files]
    steps, extra = run_settings(extra, p, meta, spec)
    t0 = time.time()
    run_dir = train_one(run_name(spec), json.dumps(mixture), model, p, method, steps, spec["seed"], extra, runs)
    matmul = matmul_of(spec, p)
    res = {**spec, "name": run_name(spec), "steps": steps, "train_s": time.time() - t0, "dtype": p["dtype"],
           "bf16_matmul": matmul, "cpu": cpu_kind(),
           "detector_sha256": ctx["detector_sha256"],
           **outcomes(os.path.join(run_dir, "export"), ctx, p, os.path.join(run_dir, "replies.jsonl"), matmul),
           **training_measures(run_dir, meta, spec)}
    if files == "offline_filter":
        with open(os.path.join(meta["folder"], "offline_filter.json"), encoding="utf-8") as f:
            res["offline_filter"] = {k: v for k, v in json.load(f).items() if k != "files"}
        res["offline_filter"]["sft_again"] = again
    res["wall_s"] = time.time() - t0
    return res


def run_settings(extra: dict, p: dict, meta: dict, spec: dict) -> tuple[int, dict]:
    """An arm's steps and settings: one epoch, one dialogue per row, in the grid's precision."""
    steps = math.ceil(meta["size"] / p["micro_batch_size"])
    settings = {**extra, "data.packing": "false", "data.skip_invalid": "true", "model.dtype": p["dtype"]}
    if p["dtype"] == "bf16":  # explicit: auto would pick by the machine
        settings["model.bf16_matmul"] = matmul_of(spec, p)
    return steps, settings


def matmul_of(spec: dict, p: dict) -> str:
    """How a run computes its bf16 products (model.bf16_matmul; the README's amendment to round 5):
    the cpu grid's runs of seeds 0 and 1 at 30% noise were made with the hardware's bf16 kernels
    (`native_matmul`); every other run of a bf16 grid computes them in fp32 from the bf16 operands, on
    any machine, so the arms of one seed share one arithmetic. The quick and gpu profiles: native."""
    native = p.get("native_matmul")
    if p["dtype"] != "bf16" or native is None:
        return "native"
    return "native" if spec["seed"] in native.get(str(spec["noise"]), ()) else "fp32"


def check_matmul(done: dict, specs: list[dict], p: dict) -> None:
    """Every run made (or kept) computed its products as matmul_of says its run must."""
    for spec in specs:
        r = done.get(run_name(spec))
        if r is not None and r.get("bf16_matmul", "native") != matmul_of(spec, p):
            raise SystemExit(f"[round5] run {r['name']} computed its bf16 products {r.get('bf16_matmul', 'native')}"
                             f", the grid's rule says {matmul_of(spec, p)} (matmul_of): set it aside (its line in "
                             "runs*.jsonl, its folder runs/<run>/, and its kept files into --keep DIR/superseded/), "
                             "and it is made again")


def made_matmul(run_dir: str) -> str:
    """How a run folder's training computed its bf16 products (its config.json; native before the key)."""
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            model = json.load(f).get("model", {})
    except (OSError, ValueError):
        return "unknown"
    return model.get("bf16_matmul", "native") if model.get("dtype") == "bf16" else "native"


def sft_model(spec: dict, p: dict, model: str, meta: dict, runs: str, done: dict) -> tuple[str, bool]:
    """The model the offline filter scores with, and whether it was trained again: the sft run of
    the same seed, which must have been made. Where it was made on another machine (its record kept,
    its model not: keep5.py), sft is trained again on the same sample, seed and steps into
    runs/<sft run>-again; the offline_filter run's record says so ("sft_again")."""
    sft = {**spec, "arm": "sft"}
    if run_name(sft) not in done:
        raise RuntimeError(f"{run_name(spec)} needs the sft run of its seed first ({run_name(sft)})")
    for name in (run_name(sft), run_name(sft) + "-again"):
        folder = os.path.join(runs, name)
        if os.path.exists(os.path.join(folder, "export")) and made_matmul(folder) == matmul_of(sft, p):
            return os.path.join(folder, "export"), name != run_name(sft)
    print(f"[round5] {run_name(spec)}: the sft model of its seed is not on this machine (or computed its "
          f"products otherwise than {matmul_of(sft, p)}); training it again",
          flush=True)
    method, extra, files = ARMS["sft"]
    steps, extra = run_settings(extra, p, meta, sft)
    shutil.rmtree(os.path.join(runs, run_name(sft) + "-again"), ignore_errors=True)  # one made otherwise
    again = train_one(run_name(sft) + "-again", json.dumps(meta["files"][files]), model, p, method, steps,
                      spec["seed"], extra, runs)
    return os.path.join(again, "export"), True


# -- the tables -----------------------------------------------------------------------------------------
def outcome_names(primary: list[str]) -> list[str]:
    return (["emission_any", *(f"emission_{k}" for k in CLASSES[1:]), "clean_nll",
             *(f"preference_{k}" for k in PROBE_KINDS)])


def value(r: dict, name: str) -> float | None:
    if name == "clean_nll":
        return r["clean_nll"]
    group, _, key = name.partition("_")
    return r[group].get(key) if group in ("emission", "preference") else None


def summarise(results: list[dict], det: dict, p: dict, candidates: tuple = CANDIDATES) -> dict:
    primary = det["primary_kinds"]
    out = {}
    for noise in sorted({r["noise"] for r in results}, reverse=True):  # 30% first, as the README reads
        at = [r for r in results if r["noise"] == noise]
        by = {a: {r["seed"]: r for r in at if r["arm"] == a} for a in ARMS}
        sft = by["sft"]
        cell = {}
        for arm, runs in by.items():
            if not runs:
                continue
            seeds = sorted(s for s in runs if s in sft)
            c = {"n": len(runs), "mean": {}, "minus_sft": {}}
            for name in outcome_names(primary):
                vals = [value(r, name) for r in runs.values() if value(r, name) is not None]
                c["mean"][name] = sum(vals) / len(vals) if vals else None
                c["minus_sft"][name] = paired([value(runs[s], name) - value(sft[s], name) for s in seeds
                                               if value(runs[s], name) is not None and value(sft[s], name) is not None])
            fam = [f"emission_{k}" for k in primary]
            c["holm"] = dict(zip(fam, holm([c["minus_sft"][k]["p"] for k in fam]))) if arm != "sft" else {}
            for k in ("removed_share", "removed_precision", "w_corrupted", "w_clean"):
                vals = [r[k] for r in runs.values() if r.get(k) is not None]
                c["mean"][k] = sum(vals) / len(vals) if vals else None
            shares = {r["seed"]: r["final_share_over_configured"] for r in runs.values()
                      if r.get("final_share_over_configured")}
            if shares:
                first = next(iter(shares.values()))
                c["final_share_over_configured"] = {s: sum(x[s] for x in shares.values()) / len(shares) for s in first}
                ratio, src, seed = max((x[s], s, sd) for sd, x in shares.items() for s in x)
                c["largest_share_over_configured"] = {"ratio": ratio, "source": src, "seed": seed}
            cell[arm] = c
        if "oracle_turn" in by and by["oracle_turn"] and sft:
            o = by["oracle_turn"]
            for arm, c in cell.items():
                c["oracle_share"] = {}
                for name in ("emission_any", *(f"emission_{k}" for k in primary)):
                    seeds = [s for s in sorted(by[arm]) if s in sft and s in o]
                    gain = [value(sft[s], name) - value(by[arm][s], name) for s in seeds]
                    ceil = [value(sft[s], name) - value(o[s], name) for s in seeds]
                    own, ref = paired(gain), paired(ceil)
                    gained = lambda d: d["lo"] is not None and d["lo"] > 0  # noqa: E731  (a resolved *reduction*)
                    c["oracle_share"][name] = ({**fieller(gain, ceil), "n": len(seeds)} if gained(own) and gained(ref)
                                               else {"share": None, "n": len(seeds), "reason": "the arm's or the "
                                                     "oracle's own reduction is not resolved"})
        aur = [r["auroc"] for r in at if r["arm"] == "two_signals" and r.get("auroc")]
        det_tab = {}
        for name in (aur[0] if aur else {}):
            det_tab[name] = {k: paired([x[name][k] for x in aur if x[name].get(k) is not None])
                             for k in ("all", *KINDS)}
        out[str(noise)] = {"arms": cell, "detection": det_tab}
    out["decision"] = decide(out, primary, len(p["seeds"]), candidates)
    return out


def decide(summary: dict, primary: list[str], seeds: int, candidates: tuple = CANDIDATES) -> dict:
    """The pre-stated success rule (README, round 5), arm by arm, on complete cells only: conditions (1)
    and (2) at 30% noise, then (3) at 30% and 0%. An arm short of `seeds` pairs for a condition it
    reaches is "incomplete", and no rule ships while any candidate is. `candidates`: those the profile
    plans (every run of its plan, whatever --only made); with none, nothing is final."""
    hi, lo = summary.get("0.3", {}).get("arms", {}), summary.get("0.0", {}).get("arms", {})
    verdict = {}
    for arm in candidates:
        if arm not in hi:
            verdict[arm] = {"passes": False, "state": "incomplete", "why": "not measured at 30% noise"}
            continue
        em = hi[arm]["minus_sft"]["emission_any"]
        if em["n"] < seeds:
            verdict[arm] = {"passes": False, "state": "incomplete",
                            "why": f"emission minus sft at 30% has {em['n']} of {seeds} seeds"}
            continue
        sh = hi[arm].get("oracle_share", {}).get("emission_any", {})
        share = sh.get("share")
        below = em["hi"] is not None and em["hi"] < 0  # (1)
        half = None if sh.get("n", 0) < seeds else share is not None and share >= 0.5  # (2); None: not judged
        v = {"emission_any_minus_sft": em, "oracle_share": share, "emission_below_sft": below,
             "half_of_oracle_gain": half, "clean_nll_noninferior_30": None, "clean_nll_noninferior_0": None}
        if below and half is None:
            verdict[arm] = {**v, "passes": False, "state": "incomplete",
                            "why": f"the oracle share has {sh.get('n', 0)} of {seeds} seeds"}
            continue
        if not (below and half):  # fails (1), or (2) on all seeds
            verdict[arm] = {**v, "passes": False, "state": "fails"}
            continue
        nll = {"30%": hi[arm]["minus_sft"]["clean_nll"], "0%": (lo.get(arm) or {}).get("minus_sft", {}).get("clean_nll")}
        short = [f"clean NLL at {cell} has {0 if d is None else d['n']} of {seeds} seeds"
                 for cell, d in nll.items() if d is None or d["n"] < seeds]
        if short:
            verdict[arm] = {**v, "passes": False, "state": "incomplete", "why": "; ".join(short)}
            continue
        v["clean_nll_noninferior_30"] = nll["30%"]["hi"] is not None and nll["30%"]["hi"] < 0.01
        v["clean_nll_noninferior_0"] = nll["0%"]["hi"] is not None and nll["0%"]["hi"] < 0.01
        ok = v["clean_nll_noninferior_30"] and v["clean_nll_noninferior_0"]
        verdict[arm] = {**v, "passes": ok, "state": "passes" if ok else "fails"}
    final = bool(verdict) and all(v["state"] != "incomplete" for v in verdict.values())
    passing = [a for a in candidates if verdict[a]["passes"]]
    # several pass: the largest reduction (the lowest mean difference); an exact tie goes to the first listed
    best = min(passing, key=lambda a: verdict[a]["emission_any_minus_sft"]["mean"]) if passing and final else None
    return {"per_arm": verdict, "final": final, "shipped": best}


def fmt(d: dict, digits: int = 3, pairs: int | None = None) -> str:
    """mean [95% t]; with its number of pairs where it differs from the row's `pairs`."""
    if d is None or d.get("mean") is None:
        return "n/a"
    s = f"{d['mean']:+.{digits}f}"
    s += "" if d.get("lo") is None else f" [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"
    return s + ("" if pairs is None or d.get("n") == pairs else f", {d['n']} pairs")


def fmt_share(arm: str, sh: dict | None) -> str:
    """The oracle-share cell: the share [95% Fieller], pairs; why there is none."""
    if arm in ("sft", "oracle_turn") or sh is None:
        return "-"
    if sh.get("share") is None:
        return f"n/a ({sh.get('reason', 'no pairs')}), {sh['n']}"
    ends = "unbounded" if sh.get("unbounded") else f"{_f(sh.get('lo'))}, {_f(sh.get('hi'))}"
    return f"{sh['share']:.2f} [{ends}], {sh['n']}"


def write_markdown(out: str, summary: dict, det: dict, p: dict, missing: list[str], decides: bool = True) -> None:
    primary = det["primary_kinds"]
    L = ["### The detector (fit before any run)", "",
         "| class | held-out precision | held-out recall | human replies flagged as it |", "| --- | --- | --- | --- |"]
    for c in (*CLASSES[1:], "any noise"):
        pc = det["per_class"][c]
        fp = det["human_flagged_as"].get(c) if c != "any noise" else 1 - det["per_class"]["human"]["recall"]
        L.append(f"| {c} | {_f(pc['precision'])} | {_f(pc['recall'])} | {_f(fp)} |")
    L += ["", f"Kinds in the primary family (recall >= 0.5 and at most 5% of human replies flagged): "
          f"{', '.join(primary) or 'none'}.", ""]
    if missing:
        L += [f"Not run ({len(missing)} of the plan's runs; the tables hold the rest): " + ", ".join(missing) + ".", ""]
    for noise, s in summary.items():
        if noise == "decision" or not s.get("arms"):
            continue
        L += [f"### Noise {float(noise):.0%}", "", "Noise-emission rate of sampled replies (T=0.7; share of "
              f"{p['contexts']} held-out contexts), paired difference from sft with its 95% t-interval and, for "
              "the primary kinds, the Holm-adjusted p:", "",
              "| arm | runs | pairs | any noise (mean of its runs) | minus sft (p) | "
              + " | ".join(f"{k} minus sft" + (" (Holm p)" if k in primary else "") for k in CLASSES[1:])
              + " | oracle share (any) [95% Fieller], pairs |",
              "| --- | --- | --- | --- | --- |" + " --- |" * len(CLASSES[1:]) + " --- |"]
        for arm, c in s["arms"].items():
            pairs = c["minus_sft"]["emission_any"]["n"]
            cells = []
            for k in CLASSES[1:]:
                h = c["holm"].get(f"emission_{k}")
                cells.append("-" if arm == "sft" else fmt(c["minus_sft"][f"emission_{k}"], pairs=pairs)
                             + ("" if h is None else f" ({h:.3f})"))
            d = c["minus_sft"]["emission_any"]
            own = "" if arm == "sft" or d.get("p") is None else f" (p {d['p']:.3f})"
            L.append(f"| {arm} | {c['n']} | {'-' if arm == 'sft' else pairs} | {_f(c['mean']['emission_any'])} | "
                     f"{'-' if arm == 'sft' else fmt(d) + own} | " + " | ".join(cells)
                     + f" | {fmt_share(arm, c.get('oracle_share', {}).get('emission_any'))} |")
        L += ["", "Clean NLL (held-out replies) and two-choice preference for held-out noise (share of pairs where "
              "the noise reply is likelier than the genuine one), paired difference from sft:", "",
              "| arm | pairs | clean NLL | minus sft | " + " | ".join(f"prefers {k} minus sft" for k in PROBE_KINDS) + " |",
              "| --- | --- | --- | --- |" + " --- |" * len(PROBE_KINDS)]
        for arm, c in s["arms"].items():
            pairs = c["minus_sft"]["clean_nll"]["n"]
            diffs = [fmt(c["minus_sft"]["clean_nll"], 4)] + [fmt(c["minus_sft"][f"preference_{k}"], pairs=pairs)
                                                              for k in PROBE_KINDS]
            L.append(f"| {arm} | {'-' if arm == 'sft' else pairs} | {_f(c['mean']['clean_nll'], 4)} | "
                     + " | ".join("-" if arm == "sft" else x for x in diffs) + " |")
        L += ["", "Weight each rule removed (share of the warm turns' weight), the share of it on corrupted turns, and "
              "the mean weight of corrupted and clean turns (source weight included):", "",
              "| arm | removed | on corrupted turns | w corrupted / clean |", "| --- | --- | --- | --- |"]
        for arm, c in s["arms"].items():
            m = c["mean"]
            if m.get("removed_share") is not None:
                L.append(f"| {arm} | {_f(m['removed_share'])} | {_f(m['removed_precision'])} | "
                         f"{_f(m['w_corrupted'])} / {_f(m['w_clean'])} |")
        for arm, c in s["arms"].items():
            if c.get("final_share_over_configured"):
                big = c["largest_share_over_configured"]
                L += ["", f"`{arm}`: each source's final share over its configured share (seed means): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in c["final_share_over_configured"].items())
                      + f". The largest in any run: {big['ratio']:.2f} ({big['source']}, seed {big['seed']}), "
                      + ("more" if big["ratio"] > SHARE_ALARM else "not more") + f" than {SHARE_ALARM:g} times."]
        if s.get("detection"):
            L += ["", "Detection in training (`two_signals` arm's audit): AUROC per signal for the corrupted turns "
                  "(mean [95% t] over seeds):", "", "| signal | all | " + " | ".join(KINDS) + " |",
                  "| --- | --- |" + " --- |" * len(KINDS)]
            for name, d in s["detection"].items():
                L.append(f"| {name} | {fmt(d['all'])} | " + " | ".join(fmt(d[k]) for k in KINDS) + " |")
        L.append("")
    dec = summary.get("decision", {})
    L += ["### The pre-stated success rule", "", "| rule | (1) emission below sft | (2) half of oracle_turn's gain | "
          "(3) clean NLL non-inferior at 30% | at 0% | verdict |", "| --- | --- | --- | --- | --- | --- |"]
    yn = {True: "yes", False: "no", None: "not judged"}
    for arm, v in dec.get("per_arm", {}).items():
        if "why" in v:
            L.append(f"| {arm} | {v['why']} | | | | {v['state']} |")
            continue
        L.append(f"| {arm} | {yn[v['emission_below_sft']]} | {yn[v['half_of_oracle_gain']]} | "
                 f"{yn[v['clean_nll_noninferior_30']]} | {yn[v['clean_nll_noninferior_0']]} | {v['state']} |")
    L += ["", "Shipped as recipes/noisy.yaml: " + (
        "nothing from this profile (the ship decision is the cpu grid's)" if not decides
        else dec["shipped"] if dec.get("shipped") else "none (no rule met the rule)" if dec.get("final")
        else "not decided (a candidate's cells are incomplete)") + ".", ""]
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(L))


def _f(x, d: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{d}f}"


def write_plot(out: str, summary: dict) -> str | None:
    """Per noise rate: each arm's paired difference from sft in the any-noise emission rate and in clean
    NLL (95% t bars)."""
    from resure_ds.report.plots import pyplot

    cells = [(n, s) for n, s in summary.items() if n != "decision" and s.get("arms")]
    if not cells:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(cells), 2, figsize=(12, 3.2 * len(cells)), squeeze=False)
    for (noise, s), (ax, bx) in zip(cells, axes):
        arms = [a for a in s["arms"] if a != "sft"]
        for i, a in enumerate(arms):
            for x, key in ((ax, "emission_any"), (bx, "clean_nll")):
                d = s["arms"][a]["minus_sft"][key]
                if d["mean"] is None:
                    continue
                err = None if d["lo"] is None else [[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]]
                x.errorbar(d["mean"], i, xerr=err, fmt="o", color="C0", capsize=3)
        for x, label in ((ax, "noise-emission rate minus sft (95% t)"), (bx, "clean NLL minus sft (nats, 95% t)")):
            x.axvline(0, color="grey", lw=0.8)
            x.set_yticks(range(len(arms)), arms)
            x.invert_yaxis()
            x.set_xlabel(label)
        bx.axvline(0.01, color="C3", lw=0.8, ls="--")
        ax.set_title(f"noise {float(noise):.0%}")
    fig.tight_layout()
    path = os.path.join(out, "round5.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- main -----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--data", default="chitchat")
    ap.add_argument("--out", default=None, help="default: benchmarks/noisy_mix/work/round5-<profile>")
    ap.add_argument("--worker", default=None, metavar="I/N",
                    help="only seeds i, i+N, ... (then run without --worker to write the tables, once "
                    "the 30%% cell is complete)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no run after this many seconds")
    ap.add_argument("--only", default=None, help="comma-separated arms: make only these runs (the tables hold "
                    "every run of the plan that is made)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds: run only these")
    ap.add_argument("--detector", default=None, metavar="PT", help="judge with this fitted detector (another "
                    "profile's detector.pt) instead of fitting one; copied into the study folder")
    ap.add_argument("--publish", default=None, metavar="DIR", help="make no run; write the tables and copy them, "
                    "every run's record, the detector's report and every sampled reply (replies.jsonl.gz) into DIR")
    ap.add_argument("--unblind", action="store_true", help="write the tables although the first cell (30%% "
                    "noise) is not complete (the study is blind until it is: README, round 5)")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep every finished run's record and replies "
                    "in DIR too (e.g. benchmarks/noisy_mix/results/round5-cpu/grid, committed), and first take "
                    "DIR's runs that the study folder lacks: a new machine continues the grid (keep5.py)")
    ap.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="the precision every run "
                    "trains and samples in (auto: bf16 where the CPU computes it natively); a grid continued "
                    "from --keep must use its runs' precision")
    ap.add_argument("--prepare-only", action="store_true", help="the held-out material, the detector and the "
                    "base model's outcomes, then stop (before starting workers side by side)")
    a = ap.parse_args()
    if a.publish and a.worker:
        raise SystemExit("[round5] --publish with --worker: a worker writes no tables; publish from a pass "
                         "without --worker")
    p = {**PROFILES[a.profile], "dtype": grid_dtype(a.dtype, a.keep)}
    grid = {"profile": a.profile, "dtype": p["dtype"]}  # what every run kept in --keep shares
    out = os.path.abspath(a.out or os.path.join(ROOT, "benchmarks", "noisy_mix", "work", f"round5-{a.profile}"))
    os.makedirs(out, exist_ok=True)
    worker = tuple(int(x) for x in a.worker.split("/")) if a.worker else None
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(int(os.environ.get("MASTER_PORT", "29733")) + (worker[0] if worker else 0))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from resure_ds.files import write_json
    from resure_ds.models import EMBEDDED, load_tokenizer, resolve_model_path

    model = tiny_model(os.path.join(out, "tiny-model")) if p["model"] == "tiny" else resolve_model_path(EMBEDDED)
    tok = load_tokenizer(model)
    t0 = time.time()
    splits = load_splits(a.data)
    test = [r for r in splits["test"] if assistant_positions(r["messages"])]
    eval_path = os.path.join(out, "test-eval.jsonl")
    write_jsonl(eval_path, test[: p["eval_dialogues"]])
    if a.detector:
        adopt_detector(a.detector, out)
    detector, det = fit_detector(splits, p, out)
    test_pool = [m["content"] for r in test for m in r["messages"] if m["role"] == "assistant"]
    ctx = {"eval_path": eval_path, "contexts": contexts(test, p, tok), "detector": detector,
           "detector_sha256": det["sha256"],
           "probes": probe_pairs(test, test_pool, p, out, tok)}
    base_path = os.path.join(out, "base.json")
    if a.keep and keep5.restore_base(a.keep, out, det["sha256"], base_matmul(p)):
        print(f"[round5] the base model's outcomes taken from {a.keep}/base", flush=True)
    if not os.path.exists(base_path):  # written whole, by a rename: a killed start leaves none
        write_json(base_path, outcomes_of_base(model, ctx, p, out))
    if a.keep:
        keep5.save_base(a.keep, out, det["sha256"])
    if a.prepare_only:
        print(f"[round5] prepared {out}: {len(ctx['contexts'])} contexts, detector primary kinds "
              f"{det['primary_kinds']}", flush=True)
        return
    whole = plan(p)  # the profile's runs: the tables hold every one of them that is made
    specs = whole
    if a.only:
        specs = [x for x in specs if x["arm"] in a.only.split(",")]
    if a.seeds:
        specs = [x for x in specs if str(x["seed"]) in a.seeds.split(",")]
    # --publish makes no run
    mine = [] if a.publish else [x for x in specs if worker is None or x["seed"] % worker[1] == worker[0]]
    log = os.path.join(out, f"runs-{worker[0]}of{worker[1]}.jsonl" if worker else "runs.jsonl")
    if a.keep:
        take_kept(a.keep, out, grid, p)
    done = made_runs(out)
    check_matmul(done, whole, p)
    todo = [x for x in mine if run_name(x) not in done]
    held = own_log(log) if todo and (a.budget_s is None or a.budget_s > 0) else None
    metas = {}
    for spec in todo:
        if a.budget_s is not None and time.time() - t0 > a.budget_s:
            continue
        key = (spec["noise"], spec["seed"])
        if key not in metas:
            metas[key] = seed_data(splits, p, spec["noise"], spec["seed"], tok, out)
        res = one_run(spec, p, model, metas[key], ctx, out, done)
        append_record(log, res)
        done[res["name"]] = res
        if a.keep:
            keep5.save(a.keep, out, grid)
        # no outcome here: the study is blind until its first cell is complete
        print(f"[round5] {res['name']} done ({res['wall_s']:.0f} s; {time.time() - t0:.0f} s in all; "
              f"{sum(run_name(x) in done for x in whole)} of {len(whole)} runs of the plan made)", flush=True)
    if held:
        held.close()
    if worker:
        return
    # whatever --only / --seeds made this time
    results = [done[run_name(s)] for s in whole if run_name(s) in done]
    missing = [run_name(s) for s in whole if run_name(s) not in done]
    blind = blind_reason(done, p)
    if blind and a.profile in DECIDING and not a.unblind:
        raise SystemExit(f"[round5] no tables written: {blind}. The study is blind until then (README, round 5); "
                         "--unblind writes them anyway")
    rechecked = recheck_detector(results, detector, det, ctx, out)
    summary = summarise(results, det, p, tuple(a for a in CANDIDATES if any(x["arm"] == a for x in whole)))
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"study": "round5", "profile": a.profile, "settings": p,
                   "arms": {k: [v[0], v[1], v[2]] for k, v in ARMS.items()}, "sources": SOURCES,
                   "corrupt_p": CORRUPT_P, "detector": det, "summary": summary, "first_cell_complete": not blind,
                   "runs": results,
                   "runs_left": len(missing), "not_run": missing, "detector_rechecked": rechecked,
                   "code": code_version()}, f, indent=1)
    write_markdown(out, summary, det, p, missing, decides=a.profile in DECIDING)
    write_plot(out, summary)
    if a.publish:
        publish(out, a.publish, results)
    left = sum(run_name(s) not in done for s in specs)
    print(f"[round5] {len(results)} of {len(whole)} runs -> {out}/results.md; "
          + (f"{left} of this pass's runs left" if left else "no run of this pass's selection is left"), flush=True)
    from resure_ds.train import cleanup

    cleanup()


def blind_reason(done: dict, p: dict) -> str | None:
    """Why the tables may not be written yet: the plan's first cell (its highest noise rate, where the
    success rule's conditions (1) and (2) are judged) has runs left; None once it is complete."""
    top = max(float(n) for n in p["noises"])
    cell = [run_name(s) for s in plan(p) if s["noise"] == top]
    left = sum(name not in done for name in cell)
    return f"the {top:.0%} cell has {len(cell) - left} of its {len(cell)} runs" if left else None


def append_record(log: str, res: dict) -> None:
    """A run's record as one line, in one write to the end of this worker's own log."""
    data = (json.dumps(res) + "\n").encode()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def own_log(log: str):
    """This pass's log, held (an exclusive flock, for as long as the returned file is open) while it
    makes runs: a second pass that would write it is refused; its unended last line is cut."""
    f = open(log, "a", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise SystemExit(f"[round5] {log} is being written by another pass that makes runs (the same --worker "
                         "started twice?): stop that one first, or give this one another --worker") from None
    cut_unended_line(log)
    return f


def cut_unended_line(log: str) -> None:
    """A line without its end in this worker's own log is the record of a run killed while writing it:
    cut it (with a line that says so), so the next record starts a line of its own; the run is made again."""
    if not os.path.exists(log):
        return
    with open(log, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
            print(f"[round5] {log}: cut its last line, a record without its end ({len(data) - keep} bytes; "
                  "its run is made again)", flush=True)


def gpu_rule(results_path: str, default: str = "two_signals_adaptive") -> str:
    """The rule the gpu profile runs beside sft and oracle_turn (benchmarks/gpu/study.sh): the one the
    CPU grid's tables shipped; where they ship none, the candidate with the largest emission reduction
    at 30% (the lowest mean difference from sft) once that cell is complete; else `default`, named
    before any result (no tables yet, or tables of a cell part-way through)."""
    if not os.path.exists(results_path):
        return default
    with open(results_path, encoding="utf-8") as f:
        tables = json.load(f)
    if not tables.get("first_cell_complete"):
        return default
    summary = tables["summary"]
    dec, arms = summary["decision"], summary.get("0.3", {}).get("arms", {})
    means = {a: arms[a]["minus_sft"]["emission_any"]["mean"] for a in dec["per_arm"] if a in arms}
    means = {a: m for a, m in means.items() if m is not None}
    return dec["shipped"] or min(means, key=means.get, default=default)


def publish(out: str, dest: str, results: list[dict]) -> None:
    """The study's record for the repository: the tables, the runs' records, the detector's report,
    the base model's outcomes and every sampled reply with its run's name and the detector's class.
    The destination's runs*.jsonl that the study folder no longer holds are removed, so the record
    is the study's runs and nothing else."""
    import glob
    import gzip
    import shutil

    if os.path.realpath(dest) == os.path.realpath(out):
        raise SystemExit(f"[round5] --publish {dest}: that is the study folder itself; name another folder "
                         "(e.g. benchmarks/noisy_mix/results/round5-cpu)")
    theirs = None
    if os.path.exists(os.path.join(dest, "results.json")):
        with open(os.path.join(dest, "results.json"), encoding="utf-8") as f:
            try:
                theirs = json.load(f)
            except ValueError:
                pass
    if ((theirs is not None or glob.glob(os.path.join(dest, "runs*.jsonl")))
            and not (isinstance(theirs, dict) and theirs.get("study") == "round5")):
        raise SystemExit(f"[round5] --publish {dest}: that folder holds a record that is not round 5's "
                         "(results.json or runs*.jsonl, which would be overwritten); name an empty folder "
                         "or round 5's own")
    os.makedirs(dest, exist_ok=True)
    runs = [os.path.basename(f) for f in sorted(glob.glob(os.path.join(out, "runs*.jsonl")))]
    for stale in glob.glob(os.path.join(dest, "runs*.jsonl")):  # an earlier publish's split of the workers
        if os.path.basename(stale) not in runs:
            print(f"[round5] --publish: removed {stale} (not in {out}: an earlier publish's file)")
            os.remove(stale)
    for name in ("results.json", "results.md", "round5.png", "detector.json", "base.json", *runs):
        if os.path.exists(os.path.join(out, name)):
            shutil.copyfile(os.path.join(out, name), os.path.join(dest, name))
    tmp = os.path.join(dest, f"replies.jsonl.gz.{os.getpid()}.tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for r in results:
            for x in read_jsonl(os.path.join(out, "runs", r["name"], "replies.jsonl")):
                f.write(json.dumps({"run": r["name"], **x}) + "\n")
    os.replace(tmp, os.path.join(dest, "replies.jsonl.gz"))


def adopt_detector(path: str, out: str) -> None:
    """Judge with a detector fitted before (so two profiles share one): copied into `out` as detector.pt;
    a study folder that already holds another one is refused."""
    import filecmp
    import shutil

    mine = os.path.join(out, "detector.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"[round5] --detector {path}: no such file (a study folder's detector.pt)")
    if os.path.exists(mine):
        if not filecmp.cmp(path, mine, shallow=False):
            raise SystemExit(f"[round5] --detector {path}: {mine} holds another detector, which judged this "
                             "folder's runs; use another --out, or drop --detector")
        return
    tmp = f"{mine}.{os.getpid()}.tmp"
    shutil.copyfile(path, tmp)
    os.replace(tmp, mine)


def recheck_detector(results: list[dict], detector, det: dict, ctx: dict, out: str) -> list[str]:
    """Every run's replies were judged by the detector of these tables: a run that names another detector
    or none (the runs made before each recorded its sha256) has its saved replies judged again, and
    stands only if every verdict is the same. Returns the runs judged again."""
    again = []
    for r in results:
        if r.get("detector_sha256") == det["sha256"]:
            continue
        path = os.path.join(out, "runs", r["name"], "replies.jsonl")
        saved = read_jsonl(path) if os.path.exists(path) else []
        if [x["id"] for x in saved] != [c["id"] for c in ctx["contexts"]]:
            raise SystemExit(f"[round5] {r['name']}: recorded with detector {r.get('detector_sha256')}, and its "
                             f"replies ({path}) are missing or not those of this study's contexts; run it again "
                             "(delete its line from runs-*.jsonl and its folder under runs/)")
        pred = judge(detector, ctx["contexts"], saved)
        differ = sum(a != x["detector"] for a, x in zip(pred, saved))
        if differ:
            raise SystemExit(f"[round5] {r['name']}: recorded with detector {r.get('detector_sha256')}; this "
                             f"study's detector ({det['sha256'][:12]}) judges {differ} of its {len(saved)} replies "
                             "otherwise; run it again (delete its line from runs-*.jsonl and its folder under runs/)")
        again.append(r["name"])
    return again


def code_version() -> dict:
    """The commit the tables were written from and the tracked files changed since (the runs record
    no commit: a grid that ran on one commit says so here)."""
    def git(*args):
        r = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    changed = git("diff", "--name-only", "HEAD")
    return {"commit": git("rev-parse", "HEAD"), "changed": changed.split("\n") if changed else []}


def cpu_kind() -> str:
    """The machine's kind as it bears on the arithmetic: the GPU's name, else the CPU's bf16 kind."""
    import torch

    from resure_ds.runtime.engine import cpu_bf16_kind

    return f"cuda:{torch.cuda.get_device_name()}" if torch.cuda.is_available() else cpu_bf16_kind()


def base_matmul(p: dict) -> str:
    """The base model's products: as most of the grid's runs compute theirs (it is no arm of a seed)."""
    return matmul_of({"noise": -1, "seed": -1}, p)


def outcomes_of_base(model: str, ctx: dict, p: dict, out: str) -> dict:
    """The base model's outcomes, for reference (its replies go to base-replies.jsonl)."""
    matmul = base_matmul(p)
    return {**outcomes(model, ctx, p, os.path.join(out, "base-replies.jsonl"), matmul), "bf16_matmul": matmul}


if __name__ == "__main__":
    main()
