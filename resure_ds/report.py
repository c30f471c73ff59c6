"""End-of-run reports: summary.txt, training.png and report.html (the data-quality report), and
the verdict as Parquet or as a filtered corpus. Written by every run at its end; on demand:

    python -m resure_ds.report RUN [--top 20]            summary, report.html, top turns listed
    python -m resure_ds.report RUN --export verdict.parquet
    python -m resure_ds.report RUN --filter OUT --min-weight 0.5 [--unit dialogue|turn]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pyarrow as pa

from .audit import read_audit, segments
from .verdict import export, filter_corpus, group_stats, last_seen

DATA_COUNTS = "data_counts.json"


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def read_config(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


# -- plots: each draws on one matplotlib axis, shared by training.png and report.html ------------
def plot_loss(ax, metrics: list[dict]) -> None:
    steps = [m["step"] for m in metrics]
    ax.plot(steps, [m["loss"] for m in metrics], label="loss (token mean)")
    ax.plot(steps, [m["weighted_loss"] for m in metrics], label="weighted loss (optimised)")
    val = [m for m in metrics if "val_loss" in m]
    if val:
        ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", label="validation loss (clean)")
    ax.set(title="loss", xlabel="step")
    ax.legend()


def plot_lr(ax, metrics: list[dict]) -> None:
    ax.plot([m["step"] for m in metrics], [m["lr"] for m in metrics])
    ax.set(title="learning rate", xlabel="step")


def plot_buckets(ax, metrics: list[dict]) -> None:
    steps = [m["step"] for m in metrics]
    mean = np.array([m["bucket_mean"] for m in metrics], dtype=float)
    std = np.array([m["bucket_std"] for m in metrics], dtype=float)
    n = np.array([m["bucket_n"] for m in metrics], dtype=float)
    mean[n < 1] = np.nan  # a bucket has no mean before its first turn
    for b in range(mean.shape[1]):
        if n[-1, b] > 1:
            ax.plot(steps, mean[:, b], label=f"turn {b}" + ("+" if b == mean.shape[1] - 1 else ""))
            ax.fill_between(steps, mean[:, b] - std[:, b], mean[:, b] + std[:, b], alpha=0.1)
    ax.set(title="Welford mean +- std of turn loss, per turn-depth bucket", xlabel="step")
    ax.legend(fontsize=7)


def plot_weights_over_steps(ax, metrics: list[dict]) -> None:
    steps = [m["step"] for m in metrics]
    ax.plot(steps, [m["mean_weight"] for m in metrics], label="mean weight")
    ax.plot(steps, [m["frac_w_lt_1"] for m in metrics], label="fraction w < 1")
    ax.plot(steps, [m["frac_w_lt_0.5"] for m in metrics], label="fraction w < 0.5")
    ax.set(title="weights over training", xlabel="step", ylim=(-0.02, 1.02))
    ax.legend()


def plot_weight_hist(ax, weights: np.ndarray) -> None:
    ax.hist(weights, bins=40, range=(0, 1), log=True)
    ax.set(title=f"weight of every trained turn ({len(weights):,} rows)", xlabel="weight")


def plot_z_by_source(ax, audit: pa.Table) -> None:
    warm = audit.filter(audit.column("warm"))
    src = warm.column("source").to_numpy(zero_copy_only=False)
    z = np.asarray(warm.column("z").to_numpy(zero_copy_only=False), dtype=float)
    names = sorted(set(src.tolist()))
    data = [z[(src == s) & np.isfinite(z)] for s in names]
    if any(len(d) for d in data):
        ax.boxplot([d if len(d) else [np.nan] for d in data], vert=False, showfliers=True,
                   flierprops={"markersize": 2})
        ax.set_yticks(range(1, len(names) + 1), [s[-30:] for s in names], fontsize=7)
    ax.set(title="turn-loss z per source (after warm-up)", xlabel="z")


def training_png(run_dir: str, metrics: list[dict], audit: pa.Table) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    plot_loss(ax[0, 0], metrics)
    plot_buckets(ax[0, 1], metrics)
    plot_weights_over_steps(ax[1, 0], metrics)
    plot_weight_hist(ax[1, 1], audit.column("weight").to_numpy())
    fig.tight_layout()
    out = os.path.join(run_dir, "training.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# -- text ---------------------------------------------------------------------------------------
def summary_lines(run_dir: str, metrics: list[dict], audit: pa.Table, data: dict | None) -> list[str]:
    last = metrics[-min(5, len(metrics)):]
    w = audit.column("weight").to_numpy()
    n, warm = len(w), int(np.sum(audit.column("warm").to_numpy(zero_copy_only=False)))
    down = int((w < 1).sum())
    lines = [
        f"run: {run_dir}",
        f"steps: {metrics[-1]['step']}   train time (sum of step times): {sum(m['step_time_s'] for m in metrics):.0f} s",
        f"final loss (mean of last {len(last)} steps): {sum(m['loss'] for m in last) / len(last):.4f}",
        f"final weighted loss: {sum(m['weighted_loss'] for m in last) / len(last):.4f}",
        f"final mean weight: {sum(m['mean_weight'] for m in last) / len(last):.4f}",
        f"turns audited: {n} ({warm} after warm-up); down-weighted (w < 1): {down} "
        f"({down / max(n, 1):.1%}), w < 0.5: {int((w < 0.5).sum())}",
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
    return lines


def top_downweighted(verdict: pa.Table, cfg: dict, k: int) -> list[dict]:
    """The k turns with the lowest last-seen weight (highest z first among equals), each with its
    reply and the message before it, read back from the training data (a scan that stops once all
    are found)."""
    from .data.records import read_dialogues
    from .data.sources import config_layout, parse_train

    v = verdict
    z = np.nan_to_num(np.asarray(v.column("z").to_numpy(zero_copy_only=False), dtype=float), nan=-np.inf)
    order = np.lexsort((-z, v.column("weight").to_numpy()))[:k]
    rows = v.take(pa.array(order, pa.int64())).to_pylist() if len(order) else []
    want: dict[str, set] = {}
    for r in rows:
        want.setdefault(r["source"], set()).add(r["dialogue_id"])
    found: dict[tuple[str, str], list[dict]] = {}
    for spec in parse_train(cfg["data"]["train"], config_layout(cfg["data"]))[0]:
        ids = want.get(spec.label, set())
        for d in read_dialogues(spec, skip_invalid=True) if ids else ():
            if d.dialogue_id in ids:
                found[(spec.label, d.dialogue_id)] = d.messages
                ids.discard(d.dialogue_id)
                if not ids:
                    break
    for r in rows:
        msgs = found.get((r["source"], r["dialogue_id"]), [])
        at = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        i = at[r["turn"]] if r["turn"] < len(at) else None
        r["text"] = _reply_text(msgs[i]) if i is not None else None
        r["before"] = (msgs[i - 1]["role"], msgs[i - 1]["content"]) if i else None
    return rows


def _reply_text(m: dict) -> str:
    """An assistant message as the report shows it: its content, then its tool calls as JSON."""
    calls = [json.dumps(c["function"], ensure_ascii=False) for c in m.get("tool_calls", ())]
    return "\n".join(x for x in (m["content"], *calls) if x)


# -- the whole report -------------------------------------------------------------------------------
def write_report(run_dir: str, data: dict | None = None, with_plot: bool = True, html: bool = True,
                 top: int = 50) -> str:
    """summary.txt, training.png (with_plot) and report.html (html); `data`: the prepared corpus'
    counts (train.data_counts), kept in the run folder for reports made later. Returns the summary."""
    return build_report(run_dir, data, with_plot, html, top)[0]


def build_report(run_dir: str, data: dict | None, with_plot: bool, html: bool, top: int) -> tuple[str, list[dict]]:
    """write_report's work; also returns the top turns it listed (with their text)."""
    t0 = time.perf_counter()
    path = os.path.join(run_dir, DATA_COUNTS)
    if data is not None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
    elif os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    metrics, audit, rows = read_metrics(run_dir), read_audit(run_dir), []
    lines = summary_lines(run_dir, metrics, audit, data)
    if with_plot:
        lines.append(f"plot: {training_png(run_dir, metrics, audit)}")
    if html:
        from .report_html import render

        cfg = read_config(run_dir)
        verdict = last_seen(audit)
        rows = top_downweighted(verdict, cfg, top)
        page = render(run_dir, cfg, metrics, audit, lines,
                      group_stats(verdict, "source"),
                      group_stats(verdict, "turn", cap=cfg["stats"]["num_buckets"] - 1), rows, with_plot)
        out = os.path.join(run_dir, "report.html")
        with open(out + ".tmp", "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(out + ".tmp", out)
        lines.append(f"report: {out} ({os.path.getsize(out) / 1e6:.2f} MB, built in {time.perf_counter() - t0:.1f} s)")
    text = "\n".join(lines)
    with open(os.path.join(run_dir, "summary.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return text, rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--top", type=int, default=20, help="list the N most down-weighted turns with their text")
    ap.add_argument("--export", metavar="PATH", help="write the verdict per turn (last-seen weight, z) as Parquet")
    ap.add_argument("--filter", metavar="OUT", help="write the corpus without what the verdict finds below --min-weight")
    ap.add_argument("--min-weight", type=float, default=0.5, help="filter threshold (default 0.5)")
    ap.add_argument("--unit", choices=("dialogue", "turn"), default="dialogue",
                    help="filter whole dialogues (default), or cut each dialogue before its first low turn")
    a = ap.parse_args(argv)
    need = [n for n in ("config.json", "metrics.jsonl") if not os.path.exists(os.path.join(a.run_dir, n))]
    if not need and os.path.isdir(os.path.join(a.run_dir, "audit")) and not segments(a.run_dir):
        raise SystemExit(f"{a.run_dir}/audit holds no Parquet segments (a run of an older version wrote "
                         "rank*.jsonl, a sample): train it again with this version to get its report")
    if need or not read_metrics(a.run_dir):
        raise SystemExit(f"{a.run_dir}: not a run folder with a logged step ({', '.join(need) or 'metrics.jsonl is empty'}"
                         "); give runs/<output.name> of a run that has trained at least one step")
    if a.export:
        print(f"{export(a.run_dir, a.export):,} turns written to {a.export}")
    if a.filter:
        c = filter_corpus(a.run_dir, a.filter, a.min_weight, a.unit)
        print(f"filter (weight < {a.min_weight}, by {a.unit}): {c['records']:,} records read; {c['kept']:,} kept, "
              f"{c['dropped']:,} dropped, {c['cut']:,} cut, {c['turns_removed']:,} turns removed; kept as they are: "
              f"{c['not_trained_kept']:,} never trained, {c['invalid_kept']:,} invalid; unreadable lines dropped: "
              f"{c['unreadable_dropped']:,}. Written to {a.filter} (counts in filter_counts.json)")
    if a.export or a.filter:
        return
    text, rows = build_report(a.run_dir, None, True, True, max(a.top, 50))
    print(text)
    print("\nmost down-weighted turns (last-seen weight):")
    for r in rows[:a.top]:
        z = "  n/a" if r["z"] is None else f"{r['z']:5.2f}"
        print(f"w={r['weight']:.3f} z={z} loss={r['loss']:.3f} step={r['step']} "
              f"{r['dialogue_id']} turn {r['turn']}: {(r['text'] or '')[:160]!r}")


if __name__ == "__main__":
    main()
