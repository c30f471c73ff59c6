"""The end-of-run report: summary.txt, training.png and report.html (the data-quality report).
Written by every run at its end; on demand with `python -m resure_ds.report RUN` (report/__main__.py).
"""
from __future__ import annotations

import json
import os
import time

from ..config.parse import train_specs
from ..data import overflow
from ..data.records import InvalidRecord, dialogue_id, raw_source, to_dialogue
from ..data.sources import read_unit, units_of
from ..files import write_json, write_text
from .html import render
from .plots import training_png
from .run_files import DATA_COUNTS, Metrics, read_config, read_report_metrics
from .scan import AuditSums, GroupStats, Lowest, audit_sums, verdict_parts


# -- text ---------------------------------------------------------------------------------------
def summary_lines(run_dir: str, metrics: Metrics, sums: AuditSums, data: dict | None) -> list[str]:
    last = metrics.last
    n, warm, down = sums.rows, sums.warm, sums.below_1
    lines = [
        f"run: {run_dir}",
        f"steps: {metrics.step}   train time (sum of step times): {metrics.train_time_s:.0f} s",
        f"final loss (mean of last {len(last)} steps): {sum(m['loss'] for m in last) / len(last):.4f}",
        f"final weighted loss: {sum(m['weighted_loss'] for m in last) / len(last):.4f}",
        f"final mean weight: {sum(m['mean_weight'] for m in last) / len(last):.4f}",
        f"turns audited: {n} ({warm} after warm-up); down-weighted (w < 1): {down} "
        f"({down / max(n, 1):.1%}), w < 0.5: {sums.below_half}",
        f"non-finite turn losses skipped: {last[-1]['nonfinite_total']}",
    ]
    if metrics.val:
        v = metrics.val[-1]
        depth = ", ".join(f"{x:.4f}" for x in v["val_depth_loss"])
        lines.append(f"validation loss at step {v['step']}: {v['val_loss']:.4f} (turn mean {v['val_turn_loss']:.4f}; "
                     f"per turn depth: {depth}; {v['val_dialogues']} dialogues)")
    if data is not None:
        skipped = data["skipped"]
        lines.append(f"invalid records skipped: {', '.join(f'{k}={v}' for k, v in sorted(skipped.items())) or 'none'}")
        lines.append(f"dialogues longer than data.max_length={data['max_length']} (data.overflow={data['policy']}): "
                     f"{overflow.summary(data)}; {data['dialogues']:,} dialogues trained from {data['rows']:,} rows; "
                     f"left with no trained token (skipped): {data['no_trained_token']}")
    return lines


def with_text(rows: list[dict], cfg: dict) -> list[dict]:
    """The verdict rows (Lowest's), each with its reply and the message before it, read back from the
    training data (a scan that stops once all are found)."""
    want: dict[str, set] = {}
    for r in rows:
        want.setdefault(r["source"], set()).add(r["dialogue_id"])
    found: dict[tuple[str, str], list[dict]] = {}
    for spec in train_specs(cfg["data"]):
        ids = want.get(spec.label, set())
        for unit in units_of(raw_source(spec)) if ids else ():
            for where, rec in read_unit(unit):
                did = dialogue_id(unit, where, rec)  # a cheap look first: most records are not wanted
                if did not in ids:
                    continue
                try:
                    found[(spec.label, did)] = to_dialogue(unit, where, rec).messages
                except InvalidRecord:
                    continue
                ids.discard(did)
                if not ids:
                    break
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
        write_json(path, data)
    elif os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    metrics, sums, rows = read_report_metrics(run_dir), audit_sums(run_dir), []
    lines = summary_lines(run_dir, metrics, sums, data)
    if with_plot:
        lines.append(f"plot: {training_png(run_dir, metrics, sums)}")
    if html:
        cfg = read_config(run_dir)
        by_source, by_depth = GroupStats("source"), GroupStats("turn", cap=cfg["stats"]["num_buckets"] - 1)
        lowest = Lowest(top)
        for v in verdict_parts(run_dir):
            for acc in (by_source, by_depth, lowest):
                acc.add(v)
        rows = with_text(lowest.rows(), cfg)
        page = render(run_dir, cfg, metrics, sums, lines, by_source.rows(), by_depth.rows(), rows, with_plot)
        out = os.path.join(run_dir, "report.html")
        write_text(out, page)
        lines.append(f"report: {out} ({os.path.getsize(out) / 1e6:.2f} MB, built in {time.perf_counter() - t0:.1f} s)")
    text = "\n".join(lines)
    write_text(os.path.join(run_dir, "summary.txt"), text + "\n")
    return text, rows
