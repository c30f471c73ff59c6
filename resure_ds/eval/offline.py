"""Held-out evaluation: clean per-turn loss of a plain HF model folder, no DeepSpeed.

    python -m resure_ds.eval MODEL_DIR DATA [--max-length 256] [--overflow split] [--batch-size 8] [--holdout F]

Reports the token-mean loss over all assistant tokens, the mean of per-turn
losses, and both per turn depth (the same turn spans and, for a dialogue
longer than --max-length, the same rows as training under data.overflow).
--holdout F evaluates only the dialogues that data.eval=F holds out of DATA
(the split training validated on, by the same hash of the dialogue id).
What was not scored is in the output too: invalid records and template
refusals skipped (by kind), dialogues --max-length left no trained token,
and the overflow policy's counts.
"""
from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass, field
from typing import Iterator

import torch
import yaml

from ..config import DataConfig, EvalConfig, positive
from ..config.parse import SourceSpec, parse_layout
from ..data.collate import collate_examples
from ..data.holdout import held_out
from ..data.overflow import POLICIES, OverflowCounts, apply as apply_overflow
from ..data.records import SkipCounter, read_dialogues
from ..data.render import Renderer
from ..errors import DataError, run_command
from ..models import causal_lm, check_model_folder, load_tokenizer, resolve_model_path
from ..runtime.nll import token_nll
from ..stats.turns import TurnLosses, shift_targets, turn_losses
from .depth import DepthSums


_DATA, _EVAL = DataConfig(), EvalConfig()  # the defaults of a run (config/sections.py)


@dataclass
class LeftOut:
    """What an evaluation did not score, for its output: nothing is left out unsaid. Invalid records
    and template refusals by kind, dialogues max_length left no trained token, and the overflow policy's
    counts (dialogues dropped, cut or split)."""
    skipped: SkipCounter = field(default_factory=SkipCounter)
    no_trained_token: int = 0
    overflow: OverflowCounts = field(default_factory=OverflowCounts)


@torch.no_grad()
def batch_turns(model, tokenizer, source, max_length: int = _DATA.max_length, batch_size: int = _EVAL.micro_batch_size, skip_invalid: bool = True,
                holdout: float | None = None, overflow: str = _DATA.overflow,
                left_out: LeftOut | None = None) -> Iterator[tuple[list[str], TurnLosses]]:
    """Yield (dialogue ids, TurnLosses) a batch at a time over a source (only its held-out split when
    holdout is a fraction); a dialogue longer than max_length as data.overflow makes it (several
    rows under split, each with the dialogue's id). What was not scored is counted in left_out."""
    renderer = Renderer(tokenizer, max_length if overflow == "cut" else None)
    left_out = LeftOut() if left_out is None else left_out
    dialogues = read_dialogues(source, skip_invalid, left_out.skipped)
    if holdout:
        dialogues = (d for d in dialogues if held_out([d.dialogue_id], holdout)[0])
    model.eval()
    dev = next(model.parameters()).device
    while True:
        chunk = list(itertools.islice(dialogues, batch_size))
        if not chunk:
            return
        rendered = renderer.render_many(chunk, left_out.skipped if skip_invalid else None)
        left_out.no_trained_token += sum(e is None for e in rendered)
        exs = [row for e in rendered if e is not None
               for row in apply_overflow(e, overflow, max_length, left_out.overflow)]
        if not exs:
            continue
        b = collate_examples(exs, tokenizer.pad_token_id)
        logits = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev)).logits
        tg = shift_targets(b["labels"].to(dev), b["turn_ids"].to(dev), b["doc_ids"].to(dev))
        yield b["dialogue_ids"], turn_losses(token_nll(logits, tg.labels), tg, len(exs), b["partial"].shape[1])


def turn_scores(model, tokenizer, source, max_length: int = _DATA.max_length, batch_size: int = _EVAL.micro_batch_size,
                skip_invalid: bool = True, holdout: float | None = None,
                overflow: str = _DATA.overflow) -> Iterator[tuple[str, int, float, int]]:
    """Yield (dialogue_id, turn, summed token NLL, trained tokens) for every turn of a source."""
    for ids, turns in batch_turns(model, tokenizer, source, max_length, batch_size, skip_invalid, holdout, overflow):
        for s, t in torch.nonzero(turns.count > 0).tolist():
            yield ids[s], t, float(turns.sum[s, t]), int(turns.count[s, t])


def evaluate(model, tokenizer, source, max_length: int = _DATA.max_length, batch_size: int = _EVAL.micro_batch_size,
             skip_invalid: bool = True, holdout: float | None = None, overflow: str = _DATA.overflow) -> dict:
    sums, dialogues, left_out = DepthSums(), set(), LeftOut()
    for ids, turns in batch_turns(model, tokenizer, source, max_length, batch_size, skip_invalid, holdout, overflow,
                                  left_out):
        dialogues.update(ids[s] for s in torch.nonzero((turns.count > 0).any(1)).flatten().tolist())
        sums.add(turns)
    s = sums.summary()
    return {
        "dialogues": len(dialogues), "tokens": s["tokens"], "turns": s["turns"], "loss": s["loss"],
        "turn_loss": s["turn_loss"],
        "per_depth": {t: {"turns": n, "loss": s["depth_loss"][t], "turn_loss": s["depth_turn_loss"][t]}
                      for t, n in enumerate(s["depth_turns"]) if n},
        "skipped": dict(sorted(left_out.skipped.items())), "no_trained_token": left_out.no_trained_token,
        "overflow": left_out.overflow.to_dict(),
    }


def load_model(model_dir: str):
    """The model (fp32) and tokenizer of a folder, or of the embedded model by its name ('smollm2')."""
    model_dir = resolve_model_path(model_dir)
    check_model_folder(model_dir)
    return causal_lm(model_dir, dtype=torch.float32), load_tokenizer(model_dir)


def evaluate_folder(model_dir: str, source, max_length: int = _DATA.max_length, batch_size: int = _EVAL.micro_batch_size,
                    holdout: float | None = None, overflow: str = _DATA.overflow) -> dict:
    model, tok = load_model(model_dir)
    return evaluate(model, tok, source, max_length, batch_size, holdout=holdout, overflow=overflow)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("data")
    data, ev = DataConfig(), EvalConfig()  # the defaults a run has (config/sections.py), not copies of them
    ap.add_argument("--max-length", type=positive(int), default=data.max_length, help=f"as data.max_length "
                    f"(default {data.max_length})")
    ap.add_argument("--overflow", choices=POLICIES, default=data.overflow,
                    help=f"a dialogue longer than --max-length, as data.overflow (default: {data.overflow})")
    ap.add_argument("--batch-size", type=positive(int), default=ev.micro_batch_size,
                    help=f"as eval.micro_batch_size (default {ev.micro_batch_size})")
    ap.add_argument("--holdout", type=positive(float, 0.5), default=None,
                    help="only the split data.eval=F (in (0, 0.5]) holds out of DATA")
    ap.add_argument("--format", default=None, help="record layout, as data.format (default: detected)")
    ap.add_argument("--columns", default=None, help="field names, as data.columns, e.g. '{messages: dialog}'")
    a = ap.parse_args()
    try:
        columns = yaml.safe_load(a.columns) if a.columns else None
    except yaml.YAMLError as e:
        ap.error(f"--columns {a.columns!r}: not a YAML mapping ({' '.join(str(e).split())})")
    layout, errors = parse_layout(a.format, columns, "--")
    if errors:
        ap.error("; ".join(errors))
    source = SourceSpec(a.data, layout=layout)

    def body() -> None:
        res = evaluate_folder(a.model_dir, source, a.max_length, a.batch_size, a.holdout, a.overflow)
        if not res["turns"]:  # a loss of 0.0 over nothing would read as a perfect model
            raise DataError(f"{a.data}: no assistant reply was scored, so there is no loss to report: the data holds "
                            "no valid dialogue in the layout read (invalid records are skipped: check --format and "
                            "--columns), or --holdout / --max-length leave none")
        print(json.dumps(res, indent=2))

    status = run_command(body)
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
