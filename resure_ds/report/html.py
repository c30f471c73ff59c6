"""report.html: the data-quality report as one self-contained page.

No script, no network: plots are PNGs inlined as data: URLs, styles inline, and a
Content-Security-Policy that allows nothing else. Every string that comes from the corpus or the
run (dialogue text, ids, source names, configuration) goes through html.escape, so a record
holding markup or `<script>` shows as text.
"""
from __future__ import annotations

import base64
import html
import io
import json
import time

import numpy as np

from .plots import (plot_buckets, plot_loss, plot_lr, plot_source_shares, plot_weight_hist, plot_weights_over_steps,
                    plot_z_by_source, pyplot, source_shares)
from .run_files import Metrics
from .scan import AuditSums

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ddd;padding:3px 7px;
vertical-align:top;text-align:right}th{background:#f4f4f4}td.t{text-align:left;white-space:pre-wrap;
max-width:420px;min-width:4em;overflow-wrap:break-word}.figs img{max-width:49%;border:1px solid #eee}
.note{color:#555;font-size:13px}pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}
.low{background:#fde8e8}
"""


def esc(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _num(x, fmt: str = "{:.3f}") -> str:
    return "" if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)


def _figure(draw, *args, size=(6, 3.6)) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=size)
    draw(ax, *args)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    alt = esc(ax.get_title())
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(rows: list[dict], cols: list[tuple[str, str, str]], low_key: str | None = None) -> str:
    """cols: (key, header, format or 't' for escaped text)."""
    head = "".join(f"<th>{esc(h)}</th>" for _, h, _ in cols)
    body = []
    for r in rows:
        cls = ' class="low"' if low_key and (r.get(low_key) or 0) >= 0.2 else ""
        cells = []
        for k, _, f in cols:
            v = r.get(k)
            cells.append(f'<td class="t">{esc(v)}</td>' if f == "t" else f"<td>{esc(_num(v, f))}</td>")
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


GROUP_COLS = [("turns", "turns", "{:,}"), ("dialogues", "dialogues", "{:,}"), ("mean_weight", "mean weight", "{:.3f}"),
              ("frac_w_lt_1", "w < 1", "{:.1%}"), ("frac_w_lt_0.5", "w < 0.5", "{:.1%}"),
              ("warm_turns", "after warm-up", "{:,}"), ("z_p10", "z p10", "{:.2f}"), ("z_p50", "z median", "{:.2f}"),
              ("z_p90", "z p90", "{:.2f}")]


def render(run_dir: str, cfg: dict, metrics: Metrics, sums: AuditSums,
           summary: list[str], by_source: list[dict], by_depth: list[dict], top: list[dict], plots: bool) -> str:
    figs = ""
    if plots:
        figs = "".join([_figure(plot_loss, metrics), _figure(plot_lr, metrics), _figure(plot_buckets, metrics),
                        _figure(plot_weights_over_steps, metrics),
                        _figure(plot_weight_hist, sums),
                        _figure(plot_z_by_source, sums, size=(6, 1.6 + 0.35 * max(len(by_source), 1))),
                        _figure(plot_source_shares, metrics) if source_shares(metrics) else ""])
    nb = cfg.get("stats", {}).get("num_buckets")
    depth_rows = [{**r, "turn": f"{r['turn']}" + ("+" if nb and r["turn"] >= nb - 1 else "")} for r in by_depth]
    for r in top:
        r["before_text"] = f"[{r['before'][0]}] {r['before'][1]}" if r.get("before") else ""
        r["reply"] = r["text"] if r.get("text") is not None else "(not found in the training data)"
    method = cfg.get("train", {}).get("method", "?")
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>ReSURE data-quality report: {esc(cfg.get('output', {}).get('name', run_dir))}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>ReSURE data-quality report: {esc(cfg.get('output', {}).get('name', run_dir))}</h1>",
        f"<p class=note>method <b>{esc(method)}</b>, model {esc(cfg.get('model', {}).get('path'))}, "
        f"report written {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}. Weights are relative to the model at the time it "
        "saw each turn: a low weight says the turn's loss was far above what turns of its depth cost the model then "
        "(see docs/method.md).</p>",
        "<h2 id=summary>Summary</h2><pre>" + esc("\n".join(summary)) + "</pre>",
        f"<h2 id=plots>Training</h2><div class=figs>{figs or '<p class=note>plots off (output.plot=false)</p>'}</div>",
        "<h2 id=sources>Reliability per source</h2>",
        "<p class=note>Each trained turn counted once, with the weight and z it had the last time it was trained; "
        "z quantiles over turns seen after warm-up. Rows with 20% or more of turns below 0.5 are shaded.</p>",
        _table(by_source, [("source", "source", "t"), *GROUP_COLS], low_key="frac_w_lt_0.5"),
        "<h2 id=depth>Reliability per turn depth</h2>",
        _table(depth_rows, [("turn", "turn depth", "t"), *GROUP_COLS], low_key="frac_w_lt_0.5"),
        f"<h2 id=turns>The {len(top)} most down-weighted turns</h2>",
        "<p class=note>Lowest last-seen weight first; the message before the reply is shown with its role. "
        "Corpus text is shown as text, never interpreted.</p>",
        _table(top, [("weight", "weight", "{:.3f}"), ("z", "z", "{:.2f}"), ("loss", "loss", "{:.3f}"),
                     ("step", "step", "{}"), ("source", "source", "t"), ("dialogue_id", "dialogue", "t"),
                     ("turn", "turn", "{}"), ("before_text", "message before", "t"), ("reply", "reply", "t")]),
        "<h2 id=config>Configuration</h2><details><summary>config.json</summary><pre>"
        + esc(json.dumps(cfg, indent=1)) + "</pre></details>",
        "</body></html>",
    ]
    return "\n".join(parts)
