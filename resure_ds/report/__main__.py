"""The report of a run, its verdict exported, or its corpus filtered:

    python -m resure_ds.report RUN [--top 20]            summary, report.html, top turns listed
    python -m resure_ds.report RUN --export verdict.parquet
    python -m resure_ds.report RUN --filter OUT --min-weight 0.5 [--unit dialogue|turn]
"""
from __future__ import annotations

import argparse
import os

from ..errors import ConfigError, run_command
from .audit import segments
from .build import build_report
from .run_files import has_a_step, read_config
from .verdict import export, filter_corpus


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="resure-ds report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--top", type=int, default=None, help="list the N most down-weighted turns with their text "
                    "(default: the run's output.report_top)")
    ap.add_argument("--export", metavar="PATH", help="write the verdict per turn (last-seen weight, z) as Parquet")
    ap.add_argument("--filter", metavar="OUT", help="write the corpus without what the verdict finds below --min-weight")
    ap.add_argument("--min-weight", type=float, default=None, help="filter threshold (default 0.5)")
    ap.add_argument("--unit", choices=("dialogue", "turn"), default=None,
                    help="filter whole dialogues (default), or cut each dialogue before its first low turn")
    a = ap.parse_args(argv)
    for flag, value in (("--export", a.export), ("--filter", a.filter)):
        if value is not None and not value.strip():
            ap.error(f"{flag} needs a path, got {value!r}")
    if a.filter is None and (a.min_weight is not None or a.unit is not None):
        ap.error("--min-weight and --unit choose what --filter keeps: give --filter OUT too")
    a.min_weight = 0.5 if a.min_weight is None else a.min_weight
    a.unit = a.unit or "dialogue"
    if a.top is not None and a.top < 0:
        ap.error(f"--top must be >= 0, got {a.top}")
    if not 0.0 < a.min_weight <= 1.0:  # NaN fails too
        ap.error(f"--min-weight must be in (0, 1] (weights are in [0, 1]), got {a.min_weight}")
    status = run_command(lambda: _run(a))
    if status:
        raise SystemExit(status)


def _run(a: argparse.Namespace) -> None:
    need = [n for n in ("config.json", "metrics.jsonl") if not os.path.exists(os.path.join(a.run_dir, n))]
    if need or not has_a_step(a.run_dir):
        missing = ", ".join(need) or "metrics.jsonl is empty"
        raise ConfigError(f"{a.run_dir}: not a run folder with a logged step ({missing}); give runs/<output.name> of a "
                          "run that has trained at least one step")
    if (a.export or a.filter) and not segments(a.run_dir):
        flag = "--export" if a.export else "--filter"
        raise ConfigError(f"{a.run_dir} has no turn audit (audit/*.parquet), so it has no verdict: {flag} would "
                          "write no turn or keep every record as never trained; use a run that audited its turns")
    if a.export:
        try:
            print(f"{export(a.run_dir, a.export):,} turns written to {a.export}")
        except OSError as e:
            raise OSError(f"--export {a.export} cannot be written ({e})") from None
    if a.filter:
        c = filter_corpus(a.run_dir, a.filter, a.min_weight, a.unit)
        print(f"filter (weight < {a.min_weight}, by {a.unit}): {c['records']:,} records read; {c['kept']:,} kept, "
              f"{c['dropped']:,} dropped, {c['cut']:,} cut, {c['turns_removed']:,} turns removed; kept as they are: "
              f"{c['not_trained_kept']:,} never trained, {c['invalid_kept']:,} invalid; unreadable lines dropped: "
              f"{c['unreadable_dropped']:,}. Written to {a.filter} (counts in filter_counts.json)")
    if a.export or a.filter:
        return
    top = a.top if a.top is not None else read_config(a.run_dir)["output"]["report_top"]
    try:
        text, rows = build_report(a.run_dir, None, True, True, top)
    except OSError as e:
        raise OSError(f"{e}; the report is written into the run folder, which must be writable") from None
    print(text)
    print("\nmost down-weighted turns (last-seen weight):")
    for r in rows[:top]:
        z = "  n/a" if r["z"] is None else f"{r['z']:5.2f}"
        print(f"w={r['weight']:.3f} z={z} loss={r['loss']:.3f} step={r['step']} "
              f"{r['dialogue_id']} turn {r['turn']}: {(r['text'] or '')[:160]!r}")


if __name__ == "__main__":
    main()
