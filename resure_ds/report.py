"""End-of-run summary, plot, and the most down-weighted turns with their text.

    python -m resure_ds.report runs/<name> [--top 20]
"""
from __future__ import annotations

import argparse
import glob
import json
import os


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def read_audit(run_dir: str) -> list[dict]:
    rows = []
    for p in sorted(glob.glob(os.path.join(run_dir, "audit", "rank*.jsonl"))):
        with open(p, encoding="utf-8") as f:
            rows += [json.loads(ln) for ln in f if ln.strip()]
    return rows


def plot(run_dir: str, metrics: list[dict], audit: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = [m["step"] for m in metrics]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    ax[0, 0].plot(steps, [m["loss"] for m in metrics], label="loss (token mean)")
    ax[0, 0].plot(steps, [m["weighted_loss"] for m in metrics], label="weighted loss (optimised)")
    val = [m for m in metrics if "val_loss" in m]
    if val:
        ax[0, 0].plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", label="validation loss (clean)")
    ax[0, 0].set_title("loss")
    ax[0, 0].legend()
    mean = np.array([m["bucket_mean"] for m in metrics], dtype=float)
    std = np.array([m["bucket_std"] for m in metrics], dtype=float)
    n = np.array([m["bucket_n"] for m in metrics], dtype=float)
    mean[n < 1] = np.nan  # a bucket has no mean before its first turn
    for b in range(mean.shape[1]):
        if n[-1, b] > 1:
            ax[0, 1].plot(steps, mean[:, b], label=f"turn {b}" + ("+" if b == mean.shape[1] - 1 else ""))
            ax[0, 1].fill_between(steps, mean[:, b] - std[:, b], mean[:, b] + std[:, b], alpha=0.1)
    ax[0, 1].set_title("Welford mean +- std of turn loss, per turn-depth bucket")
    ax[0, 1].legend(fontsize=7)
    ax[1, 0].plot(steps, [m["mean_weight"] for m in metrics], label="mean weight")
    ax[1, 0].plot(steps, [m["frac_w_lt_1"] for m in metrics], label="fraction w < 1")
    ax[1, 0].plot(steps, [m["frac_w_lt_0.5"] for m in metrics], label="fraction w < 0.5")
    ax[1, 0].set_ylim(-0.02, 1.02)
    ax[1, 0].set_title("weights over training")
    ax[1, 0].legend()
    ax[1, 1].hist([r["weight"] for r in audit], bins=40, log=True)
    ax[1, 1].set_title(f"weight distribution (audit sample, {len(audit)} turns)")
    for a in ax.flat:
        a.set_xlabel("step" if a is not ax[1, 1] else "weight")
    fig.tight_layout()
    out = os.path.join(run_dir, "training.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def write_report(run_dir: str, data: dict | None = None, with_plot: bool = True) -> str:
    """summary.txt (and training.png); `data`: the prepared corpus' counts (train.data_counts)."""
    metrics, audit = read_metrics(run_dir), read_audit(run_dir)
    last = metrics[-min(5, len(metrics)):]
    warm = [r for r in audit if r["warm"]]
    down = sum(r["weight"] < 1 for r in audit)
    lines = [
        f"run: {run_dir}",
        f"steps: {metrics[-1]['step']}   train time (sum of step times): {sum(m['step_time_s'] for m in metrics):.0f} s",
        f"final loss (mean of last {len(last)} steps): {sum(m['loss'] for m in last) / len(last):.4f}",
        f"final weighted loss: {sum(m['weighted_loss'] for m in last) / len(last):.4f}",
        f"final mean weight: {sum(m['mean_weight'] for m in last) / len(last):.4f}",
        f"turns audited: {len(audit)} ({len(warm)} after warm-up); down-weighted (w < 1): {down} "
        f"({down / max(len(audit), 1):.1%}), w < 0.5: {sum(r['weight'] < 0.5 for r in audit)}",
        f"non-finite turn losses skipped: {metrics[-1]['nonfinite_total']}",
    ]
    val = [m for m in metrics if "val_loss" in m]
    if val:
        v = val[-1]
        depth = ", ".join(f"{x:.4f}" for x in v["val_depth_loss"])
        lines.append(f"validation loss at step {v['step']}: {v['val_loss']:.4f} (turn mean {v['val_turn_loss']:.4f}; "
                     f"per turn depth: {depth}; {v['val_dialogues']} dialogues)")
    if data is not None:
        skipped = data["skipped"]
        lines.append(f"invalid records skipped: {', '.join(f'{k}={v}' for k, v in sorted(skipped.items())) or 'none'}")
        lines.append(f"dialogues whose last turn was cut by data.max_length: {data['cut_by_max_length']}; "
                     f"left with no trained token (skipped): {data['no_trained_token']}")
    if with_plot:
        lines.append(f"plot: {plot(run_dir, metrics, audit)}")
    text = "\n".join(lines)
    with open(os.path.join(run_dir, "summary.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return text


def top_downweighted(run_dir: str, k: int) -> list[dict]:
    """The k lowest-weight audited turns, with the assistant text from the training data."""
    from .data.records import read_dialogues
    from .data.sources import parse_train

    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    rows = sorted(read_audit(run_dir), key=lambda r: (r["weight"], -r["loss"]))[:k]
    want = {r["dialogue_id"] for r in rows}
    texts = {}
    for spec in parse_train(cfg["data"]["train"])[0]:
        for d in read_dialogues(spec, skip_invalid=True):
            if d.dialogue_id in want:
                texts[d.dialogue_id] = [m["content"] for m in d.messages if m["role"] == "assistant"]
    for r in rows:
        turns = texts.get(r["dialogue_id"], [])
        r["text"] = turns[r["turn"]] if r["turn"] < len(turns) else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--top", type=int, default=20, help="list the N most down-weighted turns with their text")
    a = ap.parse_args()
    print(write_report(a.run_dir))
    print(f"\nmost down-weighted turns (of the audit sample):")
    for r in top_downweighted(a.run_dir, a.top):
        z = "  n/a" if r["z"] is None else f"{r['z']:5.2f}"
        print(f"w={r['weight']:.3f} z={z} loss={r['loss']:.3f} step={r['step']} "
              f"{r['dialogue_id']} turn {r['turn']}: {(r['text'] or '')[:160]!r}")


if __name__ == "__main__":
    main()
