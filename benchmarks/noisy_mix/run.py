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

from benchmarks.noisy_mix.corrupt import KINDS, make_study_data  # noqa: E402
from benchmarks.noisy_mix.metrics import auroc, precision_recall, spearman  # noqa: E402

PROFILES = {
    "quick": dict(model="tiny", max_length=64, micro_batch_size=8, sizes=[8, 16, 24, 32], noises=[0.0, 0.3],
                  seeds=[0, 1], sweep=[{"resure.two_sided": True}], eval_limit=24, lr=1e-3, min_count=4,
                  prefilter_q=0.2, early=0.5),
    # sized to finish in under 2 hours on a 2-core CPU (about 6 s a step, about 35 s of set-up,
    # export and evaluation a run): extra seeds at 30% noise only, the sweep at the largest size
    "cpu": dict(model="smollm2", max_length=128, micro_batch_size=4, sizes=[12, 24, 48, 96], noises=[0.0, 0.3],
                seeds=[0, 1, 2], seed_noises=[0.3], eval_limit=64, lr=5e-5, min_count=16, prefilter_q=0.2,
                early=0.5, sweep=[{"resure.tau": 1.0}, {"resure.tau": 2.0}, {"resure.weight_fn": "hard"},
                                  {"resure.level": "sample"}, {"resure.propagate": "forward"},
                                  {"stats.decay": 0.99}, {"resure.two_sided": True},
                                  {"stats.length_scaled": True}]),
    "gpu": dict(model="smollm2", max_length=512, micro_batch_size=16, sizes=[256, 512, 1024, 2048],
                noises=[0.0, 0.3], seeds=[0, 1, 2], eval_limit=None, lr=5e-5, min_count=32, prefilter_q=0.2,
                early=0.5, sweep=[{"resure.tau": 1.0}, {"resure.tau": 2.0}, {"resure.weight_fn": "hard"},
                                  {"resure.weight_fn": "sigmoid"}, {"resure.level": "sample"},
                                  {"resure.propagate": "forward"}, {"stats.decay": 0.99},
                                  {"resure.two_sided": True}, {"stats.length_scaled": True}]),
}
METHODS = ["sft", "resure", "loss_truncation", "prefilter"]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def tiny_model(out: str) -> str:
    """2-layer Llama with SmolLM2's tokenizer (the quick profile's model)."""
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    from resure_ds.models import EMBEDDED, random_llama, resolve_model_path

    random_llama(resolve_model_path(EMBEDDED), out)
    return out


def prefilter_drops(model_path: str, rows: list[dict], q: float, max_length: int, work: str) -> set[str]:
    """Static baseline: score every training turn once with the base model; the dialogues holding
    the top-q fraction of turn losses are dropped (a static filter drops whole samples)."""
    from resure_ds.eval import load_model, turn_scores

    path = os.path.join(work, "prefilter-input.jsonl")
    write_jsonl(path, rows)
    model, tok = load_model(model_path)
    scored = [(nll / count, did) for did, _, nll, count in turn_scores(model, tok, path, max_length)]
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
            f"loss_truncation.min_count={p['min_count']}", "output.report_to=none", "output.plot=false", "output.report=false",
            "data.num_workers=0",  # dozens of short runs in one process: no loader process to start each time
            f"output.dir={out}", f"output.name={name}"]
    over += [f"{k}={v}" for k, v in extra.items()]
    run_recipe(load_config(None, over))
    return os.path.join(out, name)


def detection(run_dir: str, labels: list[dict]) -> dict:
    """Weights vs injected labels on complete turns seen after the method's warm-up; AUROC of z
    where the method has one (not loss truncation)."""
    from resure_ds.audit import read_audit

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
    """Every run of the grid: methods x noise x sizes (seed 0), more seeds at the largest size (at
    the noise levels in seed_noises, default all), and the ReSURE sweep at the highest noise and the
    largest size."""
    runs = []
    big, top = p["sizes"][-1], max(p["noises"])
    for noise in p["noises"]:
        for method in METHODS:
            for size in p["sizes"]:
                runs.append(dict(noise=noise, method=method, size=size, seed=p["seeds"][0], variant={}))
            for seed in p["seeds"][1:] if noise in p.get("seed_noises", p["noises"]) else []:
                runs.append(dict(noise=noise, method=method, size=big, seed=seed, variant={}))
    for v in p.get("sweep", []):
        runs.append(dict(noise=top, method="resure", size=big, seed=p["seeds"][0], variant=v))
    return runs


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
    """Runs already in <out>/runs.jsonl, by name, so an interrupted study resumes where it stopped;
    refuses an <out> that an invocation with other settings wrote."""
    path = os.path.join(out, "settings.json")
    settings = json.loads(json.dumps(settings))
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if json.load(f) != settings:
                sys.exit(f"noisy_mix: {out} holds runs made with other settings ({path}); "
                         "pass another --out or delete that folder")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)
    runs = os.path.join(out, "runs.jsonl")
    return {r["name"]: r for r in read_jsonl(runs)} if os.path.exists(runs) else {}


def summarise(results: list[dict], p: dict) -> dict:
    """Spearman(size, -test loss) per method and noise (seed 0); at the largest size, test loss over
    seeds and its difference from sft with the same seed (paired: same data order), mean and sd."""
    import numpy as np

    big = p["sizes"][-1]

    def stats(xs):
        return {"n": len(xs), "mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else None}

    def at_big(noise, method):
        return {r["seed"]: r["test"]["loss"] for r in results if r["noise"] == noise and r["method"] == method
                and not r["variant"] and r["size"] == big}

    corr, seeds, paired = {}, {}, {}
    for noise in p["noises"]:
        for method in METHODS:
            cell = size_curve(results, noise, method, p)
            key = f"{method}@{noise}"
            corr[key] = spearman([r["size"] for r in cell], [-r["test"]["loss"] for r in cell])
            mine, sft = at_big(noise, method), at_big(noise, "sft")
            seeds[key] = stats(list(mine.values()))
            paired[key] = stats([mine[s] - sft[s] for s in sorted(mine) if s in sft])
    return {"spearman_size_vs_neg_test_loss": corr, "largest_size_over_seeds": seeds,
            "largest_size_minus_sft_paired": paired}


def write_markdown(out: str, summary: dict, results: list[dict], p: dict) -> None:
    fmt = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["| method @ noise | test loss, largest size (mean +- sd over seeds) | minus sft, same seed "
             "(mean +- sd) | Spearman(size, -loss) |", "| --- | --- | --- | --- |"]
    for key, s in summary["largest_size_over_seeds"].items():
        rho, d = summary["spearman_size_vs_neg_test_loss"][key], summary["largest_size_minus_sft_paired"][key]
        lines.append(f"| {key} | {s['mean']:.4f} +- {fmt(s['std'], 4)} (n={s['n']}) "
                     f"| {d['mean']:+.4f} +- {fmt(d['std'], 4)} | {fmt(rho, 2)} |")
    lines += ["", "Clean test loss by training-set size (seed " + str(p["seeds"][0]) + "):", "",
              "| method @ noise | " + " | ".join(str(n) for n in p["sizes"]) + " |",
              "| --- |" + " --- |" * len(p["sizes"])]
    for noise in p["noises"]:
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


def plot(out: str, results: list[dict], p: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(p["noises"]), figsize=(6 * len(p["noises"]), 4), squeeze=False)
    for ax, noise in zip(axes[0], p["noises"]):
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


def plot_detection(out: str, results: list[dict], p: dict, plt) -> None:
    """AUROC of 1-w per corruption kind, for every weighting run at the highest noise and largest size."""
    runs = [r for r in results if r["noise"] == max(p["noises"]) and r["size"] == p["sizes"][-1]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--data", default="chitchat", help="any source the readers accept")
    ap.add_argument("--out", default=None, help="default: benchmarks/noisy_mix/work/<profile>")
    a = ap.parse_args()
    p = PROFILES[a.profile]
    out = os.path.abspath(a.out or os.path.join(ROOT, "benchmarks", "noisy_mix", "work", a.profile))
    os.makedirs(out, exist_ok=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from resure_ds.models import EMBEDDED, resolve_model_path

    model = tiny_model(os.path.join(out, "tiny-model")) if p["model"] == "tiny" else resolve_model_path(EMBEDDED)
    t0 = time.time()
    results, done = [], finished_runs(out, {"profile": a.profile, "data": a.data, "settings": p})
    todo = [spec for spec in plan(p) if run_name(spec) not in done]
    data = {}
    for noise in p["noises"]:
        d = os.path.join(out, f"data-noise{noise}")
        counts = make_study_data(a.data, d, noise=noise, early=p["early"], seed=0)
        train = read_jsonl(os.path.join(d, "train.jsonl"))
        test = read_jsonl(os.path.join(d, "test.jsonl"))[: p["eval_limit"]]
        write_jsonl(os.path.join(d, "test-eval.jsonl"), test)
        # the largest size holds every smaller one: score its turns once, one cut for all sizes
        drops = (prefilter_drops(model, train[: p["sizes"][-1]], p["prefilter_q"], p["max_length"], d)
                 if any(x["method"] == "prefilter" and x["noise"] == noise for x in todo) else set())
        data[noise] = dict(dir=d, train=train, labels=read_jsonl(os.path.join(d, "labels.jsonl")),
                           counts=counts, drops=drops)
    from resure_ds.eval import evaluate_folder

    for spec in plan(p):
        noise, method, size, seed = spec["noise"], spec["method"], spec["size"], spec["seed"]
        d = data[noise]
        subset = d["train"][:size]  # nested: every size is a prefix of the next
        name = run_name(spec)
        if name in done:  # finished by an earlier, interrupted invocation with the same settings
            results.append(done[name])
            continue
        path = os.path.join(out, "train-files", f"{name}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if method == "prefilter":
            subset = [row for row in subset if row["id"] not in d["drops"]]
        write_jsonl(path, subset)
        steps = max(1, math.ceil(size / p["micro_batch_size"]))  # one epoch of the unfiltered size
        run_dir = train_one(name, path, model, p, "sft" if method == "prefilter" else method, steps, seed,
                            spec["variant"], os.path.join(out, "runs"))
        test = evaluate_folder(os.path.join(run_dir, "export"), os.path.join(d["dir"], "test-eval.jsonl"),
                               p["max_length"])
        results.append({**spec, "name": name, "steps": steps, "train_dialogues": len(subset), "test": test,
                        "detection": detection(run_dir, d["labels"])})
        with open(os.path.join(out, "runs.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(results[-1]) + "\n")
        print(f"[noisy_mix] {name}: test loss {test['loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    summary = summarise(results, p)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"profile": a.profile, "settings": p, "data": {str(k): v["counts"] for k, v in data.items()},
                   "summary": summary, "runs": results, "wall_s": time.time() - t0,
                   "runs_read_back": sum(r["name"] in done for r in results)}, f, indent=1)
    write_markdown(out, summary, results, p)
    plot(out, results, p)
    print(f"[noisy_mix] {len(results)} runs in {time.time() - t0:.0f} s -> {out}/results.json", flush=True)
    from resure_ds.train import cleanup

    cleanup()


if __name__ == "__main__":
    main()
