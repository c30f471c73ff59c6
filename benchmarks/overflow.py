"""data.overflow side by side on one corpus: what each policy trains and what it costs.

For each policy, prepare the corpus at one max_length (a fresh prepared folder each, nothing
cached) and read the manifest: dialogues and rows kept, tokens per epoch (also against the whole
renderings of the dialogues), trained tokens, the assistant turns trained whole, partially and not
at all (against the whole rendering of every dialogue), and the prepare time. Ratios are against cut, measured in the same run.

    python benchmarks/overflow.py                       # the embedded corpus at max_length 256
    python benchmarks/overflow.py --data /data/x.jsonl --max-length 4096 --model /models/llama
    python benchmarks/overflow.py --results overflow.json   # the JSON in a file too
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def whole(cfg, tokenizer) -> tuple[int, int]:
    """(assistant turns with a trained token, tokens) of the whole rendering of every valid dialogue."""
    from resure_ds.config.parse import train_specs
    from resure_ds.data.records import read_dialogues
    from resure_ds.data.render import Renderer

    r, turns, tokens, batch = Renderer(tokenizer, None), 0, 0, []

    def add(batch):
        exs = [e for e in r.render_many(batch) if e is not None]
        return sum(len(np.unique(e.turn_ids[e.turn_ids >= 0])) for e in exs), sum(len(e.input_ids) for e in exs)

    for spec in train_specs(cfg.data):
        for d in read_dialogues(spec, skip_invalid=True):
            batch.append(d)
            if len(batch) == 256:
                a, b = add(batch)
                turns, tokens, batch = turns + a, tokens + b, []
    a, b = add(batch)
    return turns + a, tokens + b


def measure(policy: str, args, work: str) -> dict:
    from resure_ds.config import load_config
    from resure_ds.data.prepare import ensure_prepared
    from resure_ds.data.shards import PreparedSource
    from resure_ds.models import load_tokenizer, resolve_model_path

    cfg = load_config(None, [f"model.path={args.model}", f"data.train={args.data}", "data.skip_invalid=true",
                             f"data.max_length={args.max_length}", f"data.overflow={policy}",
                             f"data.prepared_dir={os.path.join(work, policy)}", f"data.prepare_workers={args.workers}"])
    path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(path)
    t0 = time.perf_counter()
    [p] = ensure_prepared(cfg, tok, path, progress=False)
    secs = time.perf_counter() - t0
    src = PreparedSource(p.folder)
    whole = partial = 0
    for i in range(len(src)):
        row = src.row(i)
        n = len(np.unique(row.turn_ids[row.turn_ids >= 0]))
        partial += int(row.partial.any())
        whole += n - int(row.partial.any())
    c = p.manifest["counts"]
    return {"policy": policy, "dialogues": c["dialogues"], "rows": c["rows"], "tokens": c["tokens"],
            "trained_tokens": c["trained_tokens"], "turns_whole": whole, "turns_partial": partial,
            "overflow": c["overflow"], "prepare_s": round(secs, 1), "_cfg": cfg, "_tok": tok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="chitchat")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--results", default=None,
                    help="also write the JSON here (stdout can carry the libraries' log lines: DeepSpeed's, "
                         "when the embedded model is converted on first use)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        res = [measure(p, args, work) for p in ("cut", "split", "drop")]
    total, tokens = whole(res[0]["_cfg"], res[0]["_tok"])
    cut = res[0]
    for r in res:
        r.pop("_cfg"), r.pop("_tok")
        r["turns_not_trained"] = total - r["turns_whole"] - r["turns_partial"]
        r["tokens_vs_cut"] = round(r["tokens"] / cut["tokens"], 2)
        r["tokens_vs_whole"] = round(r["tokens"] / tokens, 2)
        r["turns_whole_vs_cut"] = round(r["turns_whole"] / cut["turns_whole"], 2)
        print(f"{r['policy']:5s}: {r['dialogues']:,} dialogues in {r['rows']:,} rows, {r['tokens']:,} tokens "
              f"({r['tokens_vs_cut']}x cut, {r['tokens_vs_whole']}x the whole renderings), {r['trained_tokens']:,} trained; assistant turns of {total:,}: "
              f"{r['turns_whole']:,} whole ({r['turns_whole_vs_cut']}x cut), {r['turns_partial']:,} partial, "
              f"{r['turns_not_trained']:,} never trained; prepare {r['prepare_s']} s", file=sys.stderr)
    out = json.dumps({"max_length": args.max_length, "data": args.data, "turns": total, "whole_tokens": tokens,
                      "results": res}, indent=1)
    print(out)
    if args.results:
        with open(args.results, "w", encoding="utf-8") as f:
            f.write(out + "\n")


if __name__ == "__main__":
    main()
