"""The noisy-mix study: ReSURE vs SFT, loss truncation and a static prefilter
on mixed-quality data with ground truth, through the project's own recipe.

    python benchmarks/noisy_mix/run.py --profile quick   # tiny model, < 3 min: the pipeline and schema
    python benchmarks/noisy_mix/run.py --profile cpu     # SmolLM2-135M on a 2-core CPU machine
    python benchmarks/noisy_mix/run.py --profile gpu     # larger budget, one GPU

Every run calls resure_ds.train.run_recipe (the code path of launch/train.sh)
in this process, with one rank; only the method and its options differ
between runs of a cell (same model, data order, seed, steps, learning rate).
Writes <out>/results.json, results.md and plots; each finished run is appended to
<out>/runs.jsonl, and running the same command again resumes after the last one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks.noisy_mix.corrupt import KINDS, make_study_data, write_jsonl  # noqa: E402
from benchmarks.noisy_mix.metrics import auroc, precision_recall, spearman  # noqa: E402
from benchmarks.noisy_mix.probe import make_probe_data, probe  # noqa: E402

# Keys: sizes (nested; the size curves run at curve_noises, the largest size at every noise),
# epochs (over each size, in steps of micro_batch_size dialogues), seeds (the extra ones at the
# largest size and seed_noises), baseline_noises (where loss truncation and the prefilter run; default
# all, else only sft and resure), main_noise (the sweep's), early (share of corruptions on the first
# assistant turn), eval_limit / probe_limit (test dialogues for the clean loss / the probe), sweep (ReSURE
# variants at main_noise and the largest size, first seed), seed_variants (ReSURE variants there for
# every seed, reported beside the methods with paired differences).
PROFILES = {
    "quick": dict(model="tiny", max_length=64, micro_batch_size=8, sizes=[16, 32], epochs=1,
                  noises=[0.0, 0.3], curve_noises=[0.0, 0.3], seeds=[0, 1], seed_noises=[0.0, 0.3],
                  main_noise=0.3, sweep=[{"resure.two_sided": True}], seed_variants=[{"stats.scale": "mad"}],
                  eval_limit=24, probe_limit=8, lr=1e-3,
                  min_count=4, prefilter_q=0.2, early=0.5),
    # the regime the pilot chose (README): every corruption on the first reply (so none is lost to
    # truncation), several epochs at a learning rate where SFT fits its data; sized for a 2-core CPU
    "cpu": dict(model="smollm2", max_length=128, micro_batch_size=4, sizes=[8, 16, 32, 64], epochs=2,
                noises=[0.0, 0.3, 0.5], curve_noises=[0.0, 0.3], baseline_noises=[0.0, 0.3], seeds=[0, 1, 2],
                seed_noises=[0.3], main_noise=0.3, eval_limit=64, probe_limit=32, lr=1e-4, min_count=16,
                prefilter_q=0.2,
                early=1.0, sweep=[{"resure.min_count": 8}, {"resure.min_count": 32}, {"resure.tau": 1.0},
                                  {"resure.tau": 2.0}, {"resure.propagate": "forward"},
                                  {"stats.length_scaled": True}], seed_variants=[{"stats.scale": "mad"}]),
    # the cpu regime (every corruption on the first reply, 2 epochs, lr 1e-4) with 16 times the data
    # and 4 times the length; benchmarks/gpu/study.sh runs it in parts on a lent GPU
    "gpu": dict(model="smollm2", max_length=512, micro_batch_size=16, sizes=[128, 256, 512, 1024], epochs=2,
                noises=[0.0, 0.3, 0.5], curve_noises=[0.0, 0.3], seeds=[0, 1, 2], seed_noises=[0.3],
                main_noise=0.3, eval_limit=256, probe_limit=256, lr=1e-4, min_count=32, prefilter_q=0.2,
                early=1.0, sweep=[{"resure.min_count": 16}, {"resure.min_count": 128}, {"resure.tau": 1.0},
                                  {"resure.tau": 2.0}, {"resure.weight_fn": "hard"},
                                  {"resure.weight_fn": "sigmoid"}, {"resure.level": "sample"},
                                  {"resure.propagate": "forward"}, {"stats.decay": 0.99},
                                  {"resure.two_sided": True}, {"stats.length_scaled": True}],
                seed_variants=[{"stats.scale": "mad"}]),
}
# prefilter: drop the highest-loss dialogues up front, then train for the unfiltered size's steps (the
# same budget: it repeats what it kept); prefilter_epochs: the same cut, the same epochs over what it kept
METHODS = ["sft", "resure", "loss_truncation", "prefilter", "prefilter_epochs"]
PREFILTERS = ("prefilter", "prefilter_epochs")
RUN_LISTS = ("sweep", "seed_variants")  # settings that only add runs (each named by its variant)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def tiny_model(out: str) -> str:
    """2-layer Llama with SmolLM2's tokenizer (the quick profile's model)."""
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    from resure_ds.models import EMBEDDED, resolve_model_path
    from resure_ds.testing import random_llama

    random_llama(resolve_model_path(EMBEDDED), out)
    return out


def prefilter_drops(model_path: str, rows: list[dict], q: float, max_length: int, work: str) -> set[str]:
    """Static baseline: score every training turn once with the base model; the dialogues holding
    the top-q fraction of turn losses are dropped (a static filter drops whole samples)."""
    from resure_ds.eval.offline import load_model, turn_scores

    path = os.path.join(work, "prefilter-input.jsonl")
    write_jsonl(path, rows)
    model, tok = load_model(model_path)
    scored = [(nll / count, did) for did, _, nll, count in turn_scores(model, tok, path, max_length, overflow="cut")]
    scored.sort(reverse=True)
    return {did for _, did in scored[: int(round(q * len(scored)))]}


def train_one(name: str, data_path: str, model_path: str, p: dict, method: str, steps: int, seed: int,
              extra: dict, out: str) -> str:
    from resure_ds.config import load_config
    from resure_ds.train import run_recipe

    over = [f"model.path={model_path}", f"data.train={data_path}", f"data.max_length={p['max_length']}",
            f"train.method={method}", f"train.micro_batch_size={p['micro_batch_size']}",
            f"train.max_steps={steps}", f"train.lr={p['lr']}", "train.lr_warmup_steps=0",
            "train.schedule=constant", f"train.seed={seed}", "train.zero_stage=0", "checkpoint.keep_last=0",
            "checkpoint.resume=none", f"resure.min_count={p['min_count']}",
            f"loss_truncation.min_count={p['min_count']}", "output.report_to=none", "output.plot=false",
            "output.report=false",
            "data.overflow=cut",  # rounds 1-4 were measured so: their labels are the turns whole within max_length
            "data.num_workers=0",  # dozens of short runs in one process: no loader process to start each time
            f"output.dir={out}", f"output.name={name}"]
    over += [f"{k}={v}" for k, v in extra.items()]
    cfg = load_config(None, over)
    if cfg.stats.reference is not None:  # what launch/train.sh does first: score the corpus once
        from resure_ds.eval.score import score_all

        score_all(cfg, progress=False)
    if not run_recipe(cfg).finished:  # stopped (a signal, train.stop_after): saved and returned, no export
        raise SystemExit(f"[noisy_mix] run {name} stopped before its step {steps} (a stop signal): it has no "
                         "model to measure; the same command makes it again from its start")
    return os.path.join(out, name)


def detection(run_dir: str, labels: list[dict]) -> dict:
    """Weights vs injected labels on complete turns seen after the method's warm-up; AUROC of z
    where the method has one (not loss truncation)."""
    from resure_ds.report.audit import read_audit

    rows = [r for r in read_audit(run_dir).to_pylist() if r["warm"] and not r["partial"]]
    kinds = {(x["dialogue_id"], x["turn"]): x["kind"] for x in labels}
    y = [(r["dialogue_id"], r["turn"]) in kinds for r in rows]
    w = [r["weight"] for r in rows]

    def z_auroc(sel):
        pairs = [(rows[i]["z"], y[i]) for i in sel if rows[i]["z"] is not None]
        return auroc([a for a, _ in pairs], [b for _, b in pairs]) if pairs else None

    prec, rec = precision_recall([x < 0.5 for x in w], y)
    out = {"turns": len(rows), "corrupted": int(sum(y)), "auroc_1_minus_w": auroc([1 - x for x in w], y),
           "auroc_z": z_auroc(range(len(rows))), "precision_w_lt_0.5": prec, "recall_w_lt_0.5": rec,
           "per_kind": {}}
    for kind in sorted(set(kinds.values())):
        sel = [i for i, r in enumerate(rows) if kinds.get((r["dialogue_id"], r["turn"]), kind) == kind]
        yk = [y[i] for i in sel]
        out["per_kind"][kind] = {"n": int(sum(yk)), "auroc_1_minus_w": auroc([1 - w[i] for i in sel], yk),
                                 "auroc_z": z_auroc(sel)}
    return out


def plan(p: dict) -> list[dict]:
    """Every run of the grid, the pilot's first (sft at the largest size, no noise and the most):
    methods x sizes at curve_noises (seed 0), the largest size at every noise, more seeds there at
    seed_noises, the ReSURE sweep at main_noise and the largest size, and the seed variants there."""
    big, s0 = p["sizes"][-1], p["seeds"][0]
    runs = [dict(noise=n, method="sft", size=big, seed=s0, variant={}) for n in (0.0, max(p["noises"]))]
    for noise in p["noises"]:
        for method in METHODS if noise in p.get("baseline_noises", p["noises"]) else ["sft", "resure"]:
            for size in p["sizes"] if noise in p["curve_noises"] else [big]:
                runs.append(dict(noise=noise, method=method, size=size, seed=s0, variant={}))
            for seed in p["seeds"][1:] if noise in p["seed_noises"] else []:
                runs.append(dict(noise=noise, method=method, size=big, seed=seed, variant={}))
    for v in p.get("sweep", []):
        runs.append(dict(noise=p["main_noise"], method="resure", size=big, seed=s0, variant=v))
    for v in p.get("seed_variants", []):
        for seed in p["seeds"]:
            runs.append(dict(noise=p["main_noise"], method="resure", size=big, seed=seed, variant=v))
    seen, out = set(), []
    for r in runs:
        if run_name(r) not in seen:
            seen.add(run_name(r))
            out.append(r)
    return out


def share(runs: list[dict], p: dict, i: int, n: int) -> list[dict]:
    """Worker i's runs of n: each run goes to the least-loaded worker, in plan order, by its steps plus
    a fixed cost (load, export, evaluation) of about 10 steps."""
    load, mine = [0] * n, []
    for r in runs:
        j = load.index(min(load))
        load[j] += math.ceil(r["size"] / p["micro_batch_size"]) * p["epochs"] + 10
        if j == i:
            mine.append(r)
    return mine


def method_label(spec: dict) -> str:
    """The method and its sweep variant, e.g. resure-tau1.0."""
    tag = "-".join(f"{k.split('.')[-1]}{v}" for k, v in spec["variant"].items())
    return f"{spec['method']}{'-' + tag if tag else ''}"


def run_name(spec: dict) -> str:
    return f"n{spec['noise']}-{method_label(spec)}-s{spec['size']}-seed{spec['seed']}"


def size_curve(results: list[dict], noise: float, method: str, p: dict) -> list[dict]:
    """The runs of one method at one noise level over the nested sizes (first seed, no sweep variant)."""
    return sorted((r for r in results if r["noise"] == noise and r["method"] == method and not r["variant"]
                   and r["seed"] == p["seeds"][0]), key=lambda r: r["size"])


def finished_runs(out: str, settings: dict) -> dict:
    """Runs already in <out>/runs*.jsonl (one file per --worker), by name, so an interrupted study
    resumes where it stopped; refuses an <out> that an invocation with other settings wrote (a
    longer or shorter sweep or list of seed variants only adds or leaves out runs: accepted)."""
    path = os.path.join(out, "settings.json")
    settings = json.loads(json.dumps(settings))

    def same_runs(s: dict) -> dict:
        return {**s, "settings": {k: v for k, v in s["settings"].items() if k not in RUN_LISTS}}

    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if same_runs(json.load(f)) != same_runs(settings):
                sys.exit(f"noisy_mix: {out} holds runs made with other settings ({path}); "
                         "pass another --out or delete that folder")
    tmp = f"{path}.{os.getpid()}"  # workers start together: each writes its own file, then renames
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)
    os.replace(tmp, path)
    files = sorted(f for f in os.listdir(out) if f.startswith("runs") and f.endswith(".jsonl"))
    return {r["name"]: r for f in files for r in read_jsonl(os.path.join(out, f))}


def _stats(xs: list[float]) -> dict:
    import numpy as np

    return {"n": len(xs), "mean": float(np.mean(xs)) if xs else None,
            "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else None}


def _outcomes(r: dict) -> dict:
    """One run's outcomes by name: clean test loss, later turns, their damage, a margin per kind."""
    pr = r["probe"]
    return {"test_loss": r["test"]["loss"], "later_clean": pr["later_clean"],
            "later_delta": pr["later_delta_mean"], **{f"margin_{k}": pr["uptake_margin"][k] for k in KINDS}}


def summarise(results: list[dict], base: dict, p: dict) -> dict:
    """Spearman(size, -test loss) per method at each curve noise (first seed). At the largest size,
    per method and noise: every outcome over seeds (mean, sd) and minus sft with the same seed
    (paired: same data order); the share of sft's uptake a method prevents, per kind:
    (margin - sft's margin) / (clean sft's margin - sft's margin), on seed means."""
    big = p["sizes"][-1]
    corr, cells = {}, {}
    variants = [method_label(dict(method="resure", variant=v)) for v in p.get("seed_variants", [])]
    for noise in p["noises"]:
        for method in METHODS + (variants if noise == p["main_noise"] else []):
            key = f"{method}@{noise}"
            if noise in p["curve_noises"] and method in METHODS:
                cell = size_curve(results, noise, method, p)
                corr[key] = spearman([r["size"] for r in cell], [-r["test"]["loss"] for r in cell])
            runs = {r["seed"]: _outcomes(r) for r in results if r["noise"] == noise and method_label(r) == method
                    and r["size"] == big}
            sft = {r["seed"]: _outcomes(r) for r in results if r["noise"] == noise and method_label(r) == "sft"
                   and r["size"] == big}
            names = next(iter(runs.values())).keys() if runs else []
            cells[key] = {
                "over_seeds": {m: _stats([o[m] for o in runs.values() if o[m] is not None]) for m in names},
                "minus_sft_paired": {m: _stats([runs[s][m] - sft[s][m] for s in sorted(runs)
                                                if s in sft and runs[s][m] is not None and sft[s][m] is not None])
                                     for m in names}}
    prevented = {}
    clean = cells.get("sft@0.0", {}).get("over_seeds", {})
    for key, c in cells.items():
        noise = key.split("@")[1]
        sft = cells[f"sft@{noise}"]["over_seeds"]
        prevented[key] = {}
        for k in KINDS:
            m = f"margin_{k}"
            if float(noise) == 0.0 or m not in c["over_seeds"] or m not in clean or m not in sft:
                continue  # (a grid still in progress may lack a cell)
            lost = clean[m]["mean"] - sft[m]["mean"]
            prevented[key][k] = (c["over_seeds"][m]["mean"] - sft[m]["mean"]) / lost if lost > 0 else None
    sweep = {method_label(r): {"test_loss": r["test"]["loss"], "detection": r["detection"], "outcomes": _outcomes(r)}
             for r in results if r["seed"] == p["seeds"][0] and (r["variant"] or (
                 r["method"] == "resure" and r["noise"] == p["main_noise"] and r["size"] == big))}
    return {"spearman_size_vs_neg_test_loss": corr, "largest_size": cells, "uptake_prevented": prevented,
            "base": _outcomes(base) | {"later_delta": base["probe"]["later_delta_mean"]}, "sweep": sweep}


def write_markdown(out: str, summary: dict, results: list[dict], base: dict, p: dict) -> None:
    fmt = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    sd = lambda s, d=4: f"{fmt(s['mean'], d)} +- {fmt(s['std'], d)}"  # noqa: E731
    big = p["sizes"][-1]
    lines = [f"Largest size ({big} dialogues, {p['epochs']} epochs): mean +- sd over seeds (n), and minus sft "
             "with the same seed. Margin = loss of a corrupted first reply minus the genuine one on test "
             "contexts (higher: the model did not learn to produce that noise).", "",
             "| method @ noise | n | test loss | minus sft | later turns | later damage | "
             + " | ".join(f"margin {k}" for k in KINDS) + " | Spearman(size, -loss) |",
             "| --- | --- | --- | --- | --- | --- |" + " --- |" * len(KINDS) + " --- |"]
    b = summary["base"]
    lines.append(f"| base model | | {fmt(b['test_loss'], 4)} | | {fmt(b['later_clean'], 4)} | "
                 f"{fmt(b['later_delta'], 4)} | " + " | ".join(fmt(b[f'margin_{k}']) for k in KINDS) + " | |")
    for key, c in summary["largest_size"].items():
        o, d = c["over_seeds"], c["minus_sft_paired"]
        if not o:
            continue
        lines.append(f"| {key} | {o['test_loss']['n']} | {sd(o['test_loss'])} | {sd(d['test_loss'])} "
                     f"| {fmt(o['later_clean']['mean'], 4)} | {fmt(o['later_delta']['mean'], 4)} | "
                     + " | ".join(fmt(o[f"margin_{k}"]["mean"]) for k in KINDS)
                     + f" | {fmt(summary['spearman_size_vs_neg_test_loss'].get(key), 2)} |")
    lines += ["", "Share of sft's uptake prevented, per kind (1 = the margin of sft on clean data, 0 = sft's):",
              "", "| method @ noise | " + " | ".join(KINDS) + " |", "| --- |" + " --- |" * len(KINDS)]
    for key, v in summary["uptake_prevented"].items():
        if v:
            lines.append(f"| {key} | " + " | ".join(fmt(v.get(k), 2) for k in KINDS) + " |")
    lines += ["", "Paired differences from sft at the largest size (mean +- sd over seeds):", "",
              "| method @ noise | test loss | later damage | " + " | ".join(f"margin {k}" for k in KINDS) + " |",
              "| --- | --- | --- |" + " --- |" * len(KINDS)]
    for key, c in summary["largest_size"].items():
        d = c["minus_sft_paired"]
        if d and not key.startswith("sft@"):
            lines.append(f"| {key} | {sd(d['test_loss'])} | {sd(d['later_delta'])} | "
                         + " | ".join(sd(d[f'margin_{k}'], 3) for k in KINDS) + " |")
    lines += ["", f"Sweep (ReSURE at {p['main_noise']:.0%} noise, largest size, seed {p['seeds'][0]}): outcomes and "
              "detection (AUROC of z per kind, turns after warm-up):", "",
              "| variant | test loss | later damage | margin random | margin shuffle | AUROC 1-w | AUROC z | "
              + " | ".join(f"z {k}" for k in KINDS) + " |", "| --- |" + " --- |" * (6 + len(KINDS))]
    for name, v in summary["sweep"].items():
        det, o = v["detection"], v["outcomes"]
        lines.append(f"| {name} | {o['test_loss']:.4f} | {fmt(o['later_delta'], 4)} | {fmt(o['margin_random'])} "
                     f"| {fmt(o['margin_shuffle'])} | {fmt(det['auroc_1_minus_w'])} | {fmt(det['auroc_z'])} | "
                     + " | ".join(fmt(det["per_kind"].get(k, {}).get("auroc_z")) for k in KINDS) + " |")
    lines += ["", "Clean test loss by training-set size (seed " + str(p["seeds"][0]) + "):", "",
              "| method @ noise | " + " | ".join(str(n) for n in p["sizes"]) + " |",
              "| --- |" + " --- |" * len(p["sizes"])]
    for noise in p["curve_noises"]:
        for method in METHODS:
            by = {r["size"]: r["test"]["loss"] for r in size_curve(results, noise, method, p)}
            lines.append(f"| {method}@{noise} | " + " | ".join(fmt(by.get(n), 4) for n in p["sizes"]) + " |")
    lines += ["", "Every run: clean test loss and detection of the injected labels (turns seen after warm-up; "
              "per-kind columns: AUROC of 1-w):", "",
              "| run | test loss | turns | corrupted | AUROC 1-w | AUROC z | P(w<0.5) | R(w<0.5) | "
              + " | ".join(KINDS) + " |", "| --- |" + " --- |" * (7 + len(KINDS))]
    for r in results:
        d = r["detection"]
        kinds = " | ".join(fmt(d["per_kind"].get(k, {}).get("auroc_1_minus_w")) for k in KINDS)
        lines.append(f"| {r['name']} | {r['test']['loss']:.4f} | {d['turns']} | {d['corrupted']} "
                     f"| {fmt(d['auroc_1_minus_w'])} | {fmt(d['auroc_z'])} | {fmt(d['precision_w_lt_0.5'])} "
                     f"| {fmt(d['recall_w_lt_0.5'])} | {kinds} |")
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def plot(out: str, results: list[dict], summary: dict, p: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(p["curve_noises"]), figsize=(6 * len(p["curve_noises"]), 4), squeeze=False)
    for ax, noise in zip(axes[0], p["curve_noises"]):
        for method in METHODS:
            cell = size_curve(results, noise, method, p)
            ax.plot([r["size"] for r in cell], [r["test"]["loss"] for r in cell], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training dialogues")
        ax.set_ylabel("clean test loss")
        ax.set_title(f"noise {noise:.0%}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "test_loss_vs_size.png"), dpi=90)
    plt.close(fig)
    plot_detection(out, results, p, plt)
    plot_uptake(out, summary, plt)


def plot_detection(out: str, results: list[dict], p: dict, plt) -> None:
    """AUROC of 1-w per corruption kind, for every weighting run at the highest noise and largest size."""
    runs = [r for r in results if r["noise"] == p["main_noise"] and r["size"] == p["sizes"][-1]
            and r["seed"] == p["seeds"][0] and r["method"] in ("resure", "loss_truncation")]
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(runs)), 4))
    width = 0.8 / (len(KINDS) + 1)
    for j, kind in enumerate(("all",) + tuple(KINDS)):
        vals = [(r["detection"]["auroc_1_minus_w"] if kind == "all" else
                 r["detection"]["per_kind"].get(kind, {}).get("auroc_1_minus_w")) for r in runs]
        ax.bar([i + j * width for i in range(len(runs))], [float("nan") if v is None else v for v in vals],
               width, label=kind)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(runs))])
    ax.set_xticklabels([method_label(r) for r in runs], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("AUROC of 1 - w")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "detection_auroc.png"), dpi=90)
    plt.close(fig)


def plot_uptake(out: str, summary: dict, plt) -> None:
    """Uptake margin per corruption kind at the largest size (seed means): the base model, and every
    method at every noise level."""
    keys = [k for k, c in summary["largest_size"].items() if c["over_seeds"]]
    series = [("base", summary["base"])] + [(k, {m: v["mean"] for m, v in summary["largest_size"][k]["over_seeds"]
                                                   .items()}) for k in keys]
    fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(series) * len(KINDS) / 3), 4))
    width = 0.8 / len(series)
    for j, (name, o) in enumerate(series):
        ax.bar([i + j * width for i in range(len(KINDS))], [o[f"margin_{k}"] for k in KINDS], width, label=name,
               color=plt.cm.tab20(j % 20))  # more series than the default cycle's 10 colours
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(KINDS))])
    ax.set_xticklabels(KINDS)
    ax.set_ylabel("loss(corrupted reply) - loss(genuine reply)")
    ax.legend(fontsize=6, ncol=4)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "uptake_margin.png"), dpi=90)
    plt.close(fig)


def clean_pool(train: list[dict], labels: list[dict]) -> list[str]:
    """Genuine assistant replies of the training split (the labelled, corrupted ones left out)."""
    bad = {(x["dialogue_id"], x["turn"]) for x in labels}
    return [m["content"] for r in train for t, m in enumerate(x for x in r["messages"] if x["role"] == "assistant")
            if (r["id"], t) not in bad]


def base_outcomes(out: str, model: str, test_path: str, probe_paths: dict, max_length: int) -> dict:
    """The base model's clean test loss and probe, computed once per study folder."""
    path = os.path.join(out, "base.json")
    if not os.path.exists(path):
        from resure_ds.eval.offline import evaluate_folder

        res = {"test": evaluate_folder(model, test_path, max_length, overflow="cut"), "probe": probe(model, probe_paths, max_length)}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def pilot_table(base: dict, results: list[dict]) -> str:
    """The pilot's question: does noise damage SFT in this regime? Base model vs SFT at each noise."""
    rows = [("base model", base)] + [(f"sft @ {r['noise']:.0%}", r) for r in results]
    lines = ["| model | validation loss after each epoch | clean test loss | later turns | later damage | "
             + " | ".join(f"margin {k}" for k in KINDS) + " |",
             "| --- | --- | --- | --- | --- |" + " --- |" * len(KINDS)]
    for name, r in rows:
        pr = r["probe"]
        val = ", ".join(f"{v:.4f}" for v in r.get("val_by_epoch", []))
        lines.append(f"| {name} | {val} | {r['test']['loss']:.4f} | {pr['later_clean']:.4f} | "
                     f"{pr['later_delta_mean']:+.4f} | " + " | ".join(f"{pr['uptake_margin'][k]:+.3f}" for k in KINDS)
                     + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--data", default="chitchat", help="any source the readers accept")
    ap.add_argument("--out", default=None, help="default: benchmarks/noisy_mix/work/<profile>")
    ap.add_argument("--worker", default=None, metavar="I/N",
                    help="train only this worker's share of the runs (of N, balanced by steps), to run N processes "
                         "side by side (one thread each); then run without --worker to write the tables")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no run after this many seconds; write the tables of the runs done so far (the "
                         "same command continues the grid)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change one of the profile's settings, e.g. --set epochs=3 --set lr=2e-4 (JSON values)")
    ap.add_argument("--pilot", action="store_true",
                    help="only the pilot: sft at the largest size without noise and at the most, beside the base "
                         "model (the grid reuses these runs)")
    a = ap.parse_args()
    p = dict(PROFILES[a.profile])
    for kv in a.set:
        key, _, value = kv.partition("=")
        if key not in p:
            sys.exit(f"noisy_mix: --set {kv}: the {a.profile} profile has no setting {key!r}; it has {sorted(p)}")
        try:
            p[key] = json.loads(value)
        except ValueError:  # a bare word: the string itself
            p[key] = value
    out = os.path.abspath(a.out or os.path.join(ROOT, "benchmarks", "noisy_mix", "work", a.profile))
    os.makedirs(out, exist_ok=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    worker = tuple(int(x) for x in a.worker.split("/")) if a.worker else None
    os.environ["MASTER_PORT"] = str(int(os.environ.get("MASTER_PORT", "29533")) + (worker[0] if worker else 0))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from resure_ds.models import EMBEDDED, resolve_model_path

    model = tiny_model(os.path.join(out, "tiny-model")) if p["model"] == "tiny" else resolve_model_path(EMBEDDED)
    t0 = time.time()
    results, done = [], finished_runs(out, {"profile": a.profile, "data": a.data, "settings": p})
    specs = plan(p)[:2] if a.pilot else share(plan(p), p, *worker) if worker else plan(p)
    todo = [spec for spec in specs if run_name(spec) not in done]
    big = p["sizes"][-1]
    data = {}
    for noise in p["noises"]:
        folder = os.path.join(out, f"data-noise{noise}")
        counts = make_study_data(a.data, folder, noise=noise, early=p["early"], seed=0)
        train = read_jsonl(os.path.join(folder, "train.jsonl"))
        test_rows = read_jsonl(os.path.join(folder, "test.jsonl"))
        write_jsonl(os.path.join(folder, "test-eval.jsonl"), test_rows[: p["eval_limit"]])
        write_jsonl(os.path.join(folder, "val-eval.jsonl"),
                    read_jsonl(os.path.join(folder, "val.jsonl"))[: p["eval_limit"]])
        # the largest size holds every smaller one: score its turns once, one cut for all sizes
        drops = (prefilter_drops(model, train[:big], p["prefilter_q"], p["max_length"], folder)
                 if any(x["method"] in PREFILTERS and x["noise"] == noise for x in todo) else set())
        data[noise] = dict(dir=folder, train=train, labels=read_jsonl(os.path.join(folder, "labels.jsonl")),
                           test=test_rows, counts=counts, drops=drops)
    # The test split is the same at every noise (clean, split by hash): one probe set for all runs.
    # Its replacement replies come from the genuine replies of the highest noise's training split.
    last = data[p["noises"][-1]]
    probe_paths = make_probe_data(last["test"][: p["probe_limit"]], clean_pool(last["train"], last["labels"]), out)
    base = base_outcomes(out, model, os.path.join(last["dir"], "test-eval.jsonl"), probe_paths, p["max_length"])
    from resure_ds.eval.offline import evaluate_folder

    for spec in specs:
        noise, method, size, seed = spec["noise"], spec["method"], spec["size"], spec["seed"]
        d = data[noise]
        subset = d["train"][:size]  # nested: every size is a prefix of the next
        name = run_name(spec)
        if name in done:  # finished by an earlier, interrupted invocation with the same settings
            results.append(done[name])
            continue
        if a.budget_s is not None and time.time() - t0 > a.budget_s:
            continue  # past the budget: no new run, but every finished one is still read back
        path = os.path.join(out, "train-files", f"{name}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if method in PREFILTERS:
            subset = [row for row in subset if row["id"] not in d["drops"]]
        write_jsonl(path, subset)
        # epochs of the unfiltered size; prefilter_epochs: of what the prefilter kept
        steps = max(1, math.ceil((len(subset) if method == "prefilter_epochs" else size)
                                 / p["micro_batch_size"])) * p["epochs"]
        extra = dict(spec["variant"])
        if a.pilot:  # the clean validation loss after every epoch: where fitting turns into harm
            extra.update({"data.eval": os.path.join(d["dir"], "val-eval.jsonl"), "eval.every": steps // p["epochs"]})
        run_dir = train_one(name, path, model, p, "sft" if method in PREFILTERS else method, steps, seed,
                            extra, os.path.join(out, "runs"))
        export = os.path.join(run_dir, "export")
        scores = evaluate_folder(export, os.path.join(d["dir"], "test-eval.jsonl"), p["max_length"], overflow="cut")
        results.append({**spec, "name": name, "steps": steps, "train_dialogues": len(subset), "test": scores,
                        "detection": detection(run_dir, d["labels"]),
                        "probe": probe(export, probe_paths, p["max_length"]) if size == big else None,
                        "val_by_epoch": [m["val_loss"] for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
                                         if "val_loss" in m]})
        log = f"runs-{worker[0]}of{worker[1]}.jsonl" if worker else "runs.jsonl"
        with open(os.path.join(out, log), "a", encoding="utf-8") as f:
            f.write(json.dumps(results[-1]) + "\n")
        print(f"[noisy_mix] {name}: test loss {scores['loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    if worker:
        print(f"[noisy_mix] worker {a.worker}: {len(results)} runs in {time.time() - t0:.0f} s", flush=True)
        return
    if a.pilot:
        table = pilot_table(base, results)
        with open(os.path.join(out, "pilot.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
        print(table, flush=True)
        return
    left = len(specs) - len(results)
    if left:
        print(f"[noisy_mix] {left} of {len(specs)} runs left after the --budget-s; the tables hold the "
              "runs done so far, and the same command continues the grid", flush=True)
    summary = summarise(results, base, p)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"profile": a.profile, "settings": p, "runs_left": left,
                   "data": {str(k): v["counts"] for k, v in data.items()},
                   "base": base, "summary": summary, "runs": results, "wall_s": time.time() - t0,
                   "runs_read_back": sum(r["name"] in done for r in results)}, f, indent=1)
    write_markdown(out, summary, results, base, p)
    plot(out, results, summary, p)
    print(f"[noisy_mix] {len(results)} runs in {time.time() - t0:.0f} s -> {out}/results.json", flush=True)
    from resure_ds.train import cleanup

    cleanup()


if __name__ == "__main__":
    main()
