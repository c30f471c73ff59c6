"""Plots: each draws on one matplotlib axis, shared by training.png and report.html."""
from __future__ import annotations

import os

import numpy as np

from ..files import temp_name
from .run_files import Metrics, share_names
from .scan import AuditSums


def plot_loss(ax, metrics: Metrics) -> None:
    steps = [m["step"] for m in metrics.rows]
    ax.plot(steps, [m["loss"] for m in metrics.rows], label="loss (token mean)")
    ax.plot(steps, [m["weighted_loss"] for m in metrics.rows], label="weighted loss (optimised)")
    if metrics.val:
        val = metrics.val
        ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-" if len(val) <= 200 else "-",
                label="validation loss (clean)")
    ax.set(title="loss", xlabel="step")
    ax.legend()


def plot_lr(ax, metrics: Metrics) -> None:
    ax.plot([m["step"] for m in metrics.rows], [m["lr"] for m in metrics.rows])
    ax.set(title="learning rate", xlabel="step")


def plot_buckets(ax, metrics: Metrics) -> None:
    rows = metrics.rows
    steps = [m["step"] for m in rows]
    mean = np.array([m["bucket_mean"] for m in rows], dtype=float)
    std = np.array([m["bucket_std"] for m in rows], dtype=float)
    n = np.array([m["bucket_n"] for m in rows], dtype=float)
    mean[n < 1] = np.nan  # a bucket has no mean before its first turn
    for b in range(mean.shape[1]):
        if n[-1, b] > 1:
            ax.plot(steps, mean[:, b], label=f"turn {b}" + ("+" if b == mean.shape[1] - 1 else ""))
            ax.fill_between(steps, mean[:, b] - std[:, b], mean[:, b] + std[:, b], alpha=0.1)
    ax.set(title="Welford mean +- std of turn loss, per turn-depth bucket", xlabel="step")
    ax.legend(fontsize=7)


def plot_weights_over_steps(ax, metrics: Metrics) -> None:
    rows = metrics.rows
    steps = [m["step"] for m in rows]
    ax.plot(steps, [m["mean_weight"] for m in rows], label="mean weight")
    ax.plot(steps, [m["frac_w_lt_1"] for m in rows], label="fraction w < 1")
    ax.plot(steps, [m["frac_w_lt_0.5"] for m in rows], label="fraction w < 0.5")
    ax.set(title="weights over training", xlabel="step", ylim=(-0.02, 1.02))
    ax.legend()


def plot_weight_hist(ax, sums: AuditSums) -> None:
    ax.stairs(sums.weight_hist, np.linspace(0, 1, len(sums.weight_hist) + 1), fill=True)
    if sums.weight_hist.any():
        ax.set_yscale("log")
    ax.set(title=f"weight of every trained turn ({sums.rows:,} rows)", xlabel="weight")


def plot_z_by_source(ax, sums: AuditSums) -> None:
    """A box per source: quartiles, whiskers at 1.5 IQR (within the data), the extremes beyond them."""
    names = sorted(n for n, q in sums.z_by_source.items() if q.count)
    boxes = []
    for n in names:
        q = sums.z_by_source[n]
        q1, med, q3 = q.quantiles([0.25, 0.5, 0.75])
        lo, hi = max(q.lo, q1 - 1.5 * (q3 - q1)), min(q.hi, q3 + 1.5 * (q3 - q1))
        boxes.append({"med": med, "q1": q1, "q3": q3, "whislo": lo, "whishi": hi, "label": n[-30:],
                      "fliers": [x for x in (q.lo, q.hi) if x < lo or x > hi]})
    if boxes:
        ax.bxp(boxes, orientation="horizontal", showfliers=True, flierprops={"markersize": 2})
        ax.tick_params(axis="y", labelsize=7)
    ax.set(title="turn-loss z per source (after warm-up)", xlabel="z")


def pyplot():
    """matplotlib's pyplot, headless, with mathtext off: corpus text (a source's name, a path) becomes
    labels here, and a label holding $...$ would otherwise be parsed as math, and fail."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def source_shares(metrics: Metrics) -> dict[str, list]:
    """source_share/<name> per plotted step, by name (empty for a run of one source)."""
    rows = metrics.rows
    names = share_names(rows[-1]) if rows else []
    if len(names) < 2:
        return {}
    return {n: [m.get(f"source_share/{n}") for m in rows] for n in names}


def plot_source_shares(ax, metrics: Metrics) -> None:
    steps = [m["step"] for m in metrics.rows]
    for name, v in source_shares(metrics).items():
        ax.plot(steps, [np.nan if x is None else x for x in v], label=name[-30:])
    adaptive = any(len({round(x, 9) for x in v if x is not None}) > 1 for v in source_shares(metrics).values())
    ax.set(title="each source's share" + (" (data.mixture=adaptive)" if adaptive else ""), xlabel="step",
           ylim=(0, None))
    ax.legend(fontsize=7)


def training_png(run_dir: str, metrics: Metrics, sums: AuditSums) -> str:
    plt = pyplot()

    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    plot_loss(ax[0, 0], metrics)
    plot_buckets(ax[0, 1], metrics)
    plot_weights_over_steps(ax[1, 0], metrics)
    plot_weight_hist(ax[1, 1], sums)
    fig.tight_layout()
    out = os.path.join(run_dir, "training.png")
    fig.savefig(temp_name(out), dpi=90, format="png")
    os.replace(temp_name(out), out)
    plt.close(fig)
    return out
