"""The verdict: last-seen weight per turn, per-group reliability, Parquet export, corpus filter."""
import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resure_ds.report.audit import AuditLog
from resure_ds.report.scan import GroupStats, last_seen
from resure_ds.report.verdict import export, filter_corpus


def row(src, did, turn, w, step, z=0.0, warm=True):
    return {"source": src, "dialogue_id": did, "turn": turn, "loss": 2.0, "z": z, "weight": w, "warm": warm,
            "step": step, "partial": False}


def write_run(run_dir, train, audit_rows):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"data": {"train": train}}, f)
    log = AuditLog(str(run_dir), 0)
    log.add(audit_rows)
    log.flush()


def dialog(did, n_turns, layout="openai"):
    if layout == "openai":
        msgs = []
        for t in range(n_turns):
            msgs += [{"role": "user", "content": f"q{t}"}, {"role": "assistant", "content": f"a{t}"}]
        return {"id": did, "messages": [{"role": "system", "content": "sys"}, *msgs]}
    conv = []
    for t in range(n_turns):
        conv += [{"from": "human", "value": f"q{t}"}, {"from": "gpt", "value": f"a{t}"}]
    return {"id": did, "conversations": conv}


def test_last_seen_takes_the_latest_step_and_counts_visits():
    log_rows = [row("s", "a", 0, 0.2, 1), row("s", "a", 0, 0.9, 5), row("s", "a", 1, 1.0, 1), row("t", "a", 0, 0.4, 2)]
    v = last_seen(pa.Table.from_pylist(log_rows[::-1])).to_pylist()
    assert [(r["source"], r["dialogue_id"], r["turn"], r["weight"], r["step"], r["times_seen"]) for r in v] == [
        ("s", "a", 0, 0.9, 5, 2), ("s", "a", 1, 1.0, 1, 1), ("t", "a", 0, 0.4, 2, 1)]


def group_stats(v, by, cap=None):
    g = GroupStats(by, cap)
    g.add(v)
    return g.rows()


def test_group_stats_per_source():
    rows = [row("s", "a", 0, 1.0, 1, z=-1.0), row("s", "b", 0, 0.4, 1, z=3.0), row("s", "b", 1, 0.8, 1, z=2.0),
            row("s", "c", 0, 1.0, 1, z=None, warm=False), row("t", "x", 0, 1.0, 1, z=0.0)]
    s, t = group_stats(last_seen(pa.Table.from_pylist(rows)), "source")
    assert s["source"] == "s" and s["turns"] == 4 and s["dialogues"] == 3 and s["warm_turns"] == 3
    assert s["mean_weight"] == pytest.approx(0.8) and s["frac_w_lt_1"] == 0.5 and s["frac_w_lt_0.5"] == 0.25
    assert s["z_p50"] == pytest.approx(2.0)
    assert t["turns"] == 1 and t["frac_w_lt_1"] == 0.0
    by_turn = group_stats(last_seen(pa.Table.from_pylist(rows)), "turn")
    assert [(r["turn"], r["turns"]) for r in by_turn] == [(0, 4), (1, 1)]
    rows.append(row("s", "b", 5, 0.2, 1))
    capped = group_stats(last_seen(pa.Table.from_pylist(rows)), "turn", cap=1)  # depth 5 joins bucket 1+
    assert [(r["turn"], r["turns"], r["frac_w_lt_0.5"]) for r in capped] == [(0, 4, 0.25), (1, 2, 0.5)]


def test_export_writes_one_row_per_turn(tmp_path):
    write_run(tmp_path / "run", "x.jsonl", [row("s", "a", 0, 0.3, 1), row("s", "a", 0, 0.6, 2), row("s", "b", 1, 1.0, 2)])
    assert export(str(tmp_path / "run"), str(tmp_path / "out" / "v.parquet")) == 2
    t = pq.read_table(tmp_path / "out" / "v.parquet").to_pylist()
    assert [(r["dialogue_id"], r["turn"], r["weight"], r["times_seen"]) for r in t] == [("a", 0, 0.6, 2), ("b", 1, 1.0, 1)]


@pytest.mark.parametrize("unit", ["dialogue", "turn"])
def test_filter_writes_each_source_in_its_own_format(tmp_path, unit):
    jl, js, pqf = tmp_path / "a.jsonl.gz", tmp_path / "b.json", tmp_path / "c.parquet"
    with gzip.open(jl, "wt") as f:
        for r in [dialog("a1", 3), dialog("a2", 2), dialog("a3", 1), {"messages": []}]:
            f.write(json.dumps(r) + "\n")
        f.write("{not json\n")
    with open(js, "w") as f:
        json.dump({"data": [dialog("b1", 2, "sharegpt"), dialog("b2", 2, "sharegpt")]}, f)
    pq.write_table(pa.Table.from_pylist([dialog("c1", 2), dialog("c2", 2)]), pqf)
    train = [{"path": str(jl), "name": "A"}, {"path": str(js), "name": "B"}, str(pqf)]
    write_run(tmp_path / "run", train, [
        row("A", "a1", 0, 1.0, 1), row("A", "a1", 1, 0.3, 1), row("A", "a1", 2, 1.0, 1),  # a1: turn 1 low
        row("A", "a2", 0, 0.1, 1), row("A", "a2", 1, 1.0, 1),                             # a2: turn 0 low
        row("B", "b1", 0, 0.2, 1), row("B", "b1", 0, 0.9, 2), row("B", "b2", 1, 0.4, 2),  # b1 recovered; b2 low
        row(str(pqf), "c1", 0, 1.0, 1), row(str(pqf), "c1", 1, 0.5, 1)])                    # c1: 0.5 is kept; c2 unseen
    c = filter_corpus(str(tmp_path / "run"), str(tmp_path / "out"), 0.5, unit)
    assert c["records"] == 9 and c["kept"] == 2 and c["not_trained_kept"] == 2  # b1, c1; a3, c2
    assert c["invalid_kept"] == 1 and c["unreadable_dropped"] == 1
    out = {os.path.basename(p): p for p in c["outputs"]}
    with gzip.open(out["a.jsonl.gz"], "rt") as f:
        a = [json.loads(ln) for ln in f]
    with open(out["b.json"]) as f:
        b = json.load(f)
    cc = pq.read_table(out["c.parquet"]).to_pylist()
    assert [r["id"] for r in cc] == ["c1", "c2"] and cc[0] == dialog("c1", 2)
    if unit == "dialogue":
        assert c["dropped"] == 3 and c["cut"] == 0 and c["turns_removed"] == 3 + 2 + 2
        assert [r.get("id") for r in a] == ["a3", None] and [r["id"] for r in b] == ["b1"]
    else:  # a1 keeps turn 0 and its context; a2 has nothing left; b2 keeps turn 0
        assert c["dropped"] == 1 and c["cut"] == 2 and c["turns_removed"] == 2 + 2 + 1
        assert [r.get("id") for r in a] == ["a1", "a3", None]
        assert [m["content"] for m in a[0]["messages"]] == ["sys", "q0", "a0"]
        assert [r["id"] for r in b] == ["b1", "b2"] and [m["value"] for m in b[1]["conversations"]] == ["q0", "a0"]
    with open(tmp_path / "out" / "filter_counts.json") as f:
        assert json.load(f)["records"] == 9


def test_filter_never_writes_over_into_or_around_an_input(tmp_path):
    """The corpus in iter/00-a/a.jsonl, filtered into iter (which holds it), into its own folder, or into a
    used output: each is one clear error, and the source is left byte for byte as it was."""
    src = tmp_path / "iter" / "00-a" / "a.jsonl"
    os.makedirs(src.parent)
    src.write_text("".join(json.dumps(dialog(f"a{i}", 2)) + "\n" for i in range(3)))
    before = src.read_bytes()
    write_run(tmp_path / "run", [{"path": str(src), "name": "a"}], [row("a", "a0", 1, 0.1, 1), row("a", "a1", 0, 1, 1)])
    for out in (tmp_path / "iter", tmp_path / "iter" / "00-a", tmp_path):  # tmp_path holds the run too
        with pytest.raises(ValueError, match="an input of this run|a file of the run"):
            filter_corpus(str(tmp_path / "run"), str(out), 0.5)
    assert src.read_bytes() == before and sorted(os.listdir(src.parent)) == ["a.jsonl"]
    write_run(tmp_path / "run2", [{"path": str(src.parent), "name": "a"}], [row("a", "a0", 1, 0.1, 1)])
    with pytest.raises(ValueError, match="lies inside .*00-a, an input of this run"):  # a folder source
        filter_corpus(str(tmp_path / "run2"), str(src.parent / "filtered"), 0.5)
    c = filter_corpus(str(tmp_path / "run"), str(tmp_path / "out"), 0.5)
    assert c["dropped"] == 1 and sorted(os.listdir(tmp_path)) == ["iter", "out", "run", "run2"]  # no .partial left
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        filter_corpus(str(tmp_path / "run"), str(tmp_path / "out"), 0.5)
    assert src.read_bytes() == before


def test_report_command_refuses_bad_filter_arguments(tmp_path):
    import subprocess
    import sys

    write_run(tmp_path / "run", "x.jsonl", [row("s", "a", 0, 0.3, 1)])
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    for args, msg in ((["--min-weight", "nan"], "--min-weight must be in"), (["--top", "-1"], "--top must be"),
                      (["--min-weight", "2"], "--min-weight must be in"), (["--filter", " "], "--filter needs a path")):
        out = subprocess.run([sys.executable, "-m", "resure_ds.report", str(tmp_path / "run"), "--filter",
                              str(tmp_path / "o"), *args], capture_output=True, text=True)
        assert out.returncode == 2 and msg in out.stderr, out.stderr
    for args, msg in ((["--export", ""], "--export needs a path, got ''"),
                      (["--min-weight", "0.3"], "--min-weight and --unit choose what --filter keeps")):
        out = subprocess.run([sys.executable, "-m", "resure_ds.report", str(tmp_path / "run"), *args],
                             capture_output=True, text=True)
        assert out.returncode == 2 and "resure-ds report: error: " + msg in out.stderr, out.stderr
    os.rename(tmp_path / "run" / "audit", tmp_path / "run" / "no-audit")
    out = subprocess.run([sys.executable, "-m", "resure_ds.report", str(tmp_path / "run"), "--filter",
                          str(tmp_path / "o")], capture_output=True, text=True)
    assert out.returncode == 2 and "[resure_ds] error: " in out.stderr and "has no turn audit" in out.stderr
    assert not os.path.exists(tmp_path / "o")


def test_filter_refuses_a_source_edited_since_the_run(tmp_path):
    """Records without an id are keyed file:line: one line inserted before filtering would make the verdict
    drop the wrong records. The run records its sources' fingerprints; the filter refuses a change."""
    from resure_ds.config.parse import SourceSpec
    from resure_ds.data.sources import resolve, source_fingerprint
    from resure_ds.report.run_files import write_sources

    src = tmp_path / "a.jsonl"
    lines = [json.dumps({"messages": dialog("x", 2)["messages"]}) for _ in range(3)]  # no ids: keyed by line
    src.write_text("\n".join(lines) + "\n")
    write_run(tmp_path / "run", [{"path": str(src), "name": "a"}], [row("a", "a.jsonl:2", 0, 0.1, 1)])
    write_sources(str(tmp_path / "run"), [{"name": "a", "files": source_fingerprint(resolve(SourceSpec(str(src))))}])
    assert filter_corpus(str(tmp_path / "run"), str(tmp_path / "ok"), 0.5)["dropped"] == 1
    src.write_text(lines[0] + "\n" + json.dumps(dialog("new", 1)) + "\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl has \d+ bytes \(the run read \d+\) since the run trained on "
                                         "source a"):
        filter_corpus(str(tmp_path / "run"), str(tmp_path / "edited"), 0.5)
    assert not os.path.exists(tmp_path / "edited")


def test_export_never_writes_onto_an_input_or_a_file_of_the_run(tmp_path):
    """--export onto the corpus the run trained on, onto metrics.jsonl, into the audit folder or onto a
    folder: one clear error each, nothing changed and no temporary left; a new file in the run folder
    is fine."""
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(dialog(f"a{i}", 2)) + "\n" for i in range(3)))
    run = tmp_path / "run"
    write_run(run, [{"path": str(src), "name": "a"}], [row("a", "a0", 1, 0.1, 1)])
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = {p: p.read_bytes() for p in (src, run / "metrics.jsonl")}
    for target, what in ((src, "is .*data.jsonl, an input of this run"),
                         (run / "metrics.jsonl", "is .*metrics.jsonl, a file of the run"),
                         (run / "audit" / "rank00000-seg000009.parquet", "lies inside .*audit, a file of the run"),
                         (run, "holds .*, a file of the run")):
        with pytest.raises(ValueError, match=what):
            export(str(run), str(target))
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        export(str(run), str(tmp_path / "out"))
    assert {p: p.read_bytes() for p in before} == before
    assert not [n for n in os.listdir(tmp_path) + os.listdir(run) if ".tmp" in n]
    assert export(str(run), str(run / "verdict.parquet")) == 1


def test_filter_onto_a_link_to_an_empty_folder_fills_that_folder_and_a_failure_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(dialog(f"a{i}", 2)) + "\n" for i in range(3)))
    write_run(tmp_path / "run", [{"path": str(src), "name": "a"}], [row("a", "a0", 1, 0.1, 1), row("a", "a1", 0, 1, 1)])
    (tmp_path / "empty").mkdir()
    os.symlink(tmp_path / "empty", tmp_path / "link")
    c = filter_corpus(str(tmp_path / "run"), str(tmp_path / "link"), 0.5)
    assert c["dropped"] == 1 and os.path.islink(tmp_path / "link")
    assert "filter_counts.json" in os.listdir(tmp_path / "empty")
    import resure_ds.report.verdict as verdict

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(verdict, "_filter_into", broken)  # a failure half way: nothing is left behind
    with pytest.raises(OSError, match="disk full"):
        filter_corpus(str(tmp_path / "run"), str(tmp_path / "new"), 0.5)
    assert sorted(os.listdir(tmp_path)) == ["data.jsonl", "empty", "link", "run"]


def test_a_glob_source_protects_its_folder_and_a_link_inside_an_input_is_refused(tmp_path):
    """A filter into the folder a glob reads (data/**/*.jsonl) would be read back next time; an export
    onto a link that lies inside the data (pointing elsewhere) would replace the link there."""
    (tmp_path / "data" / "sub").mkdir(parents=True)
    for p in (tmp_path / "data" / "a.jsonl", tmp_path / "data" / "sub" / "b.jsonl"):
        p.write_text("".join(json.dumps(dialog(f"{p.stem}{i}", 2)) + "\n" for i in range(2)))
    write_run(tmp_path / "run", [{"path": str(tmp_path / "data" / "**" / "*.jsonl"), "name": "g"}],
              [row("g", "a0", 1, 0.1, 1)])
    with pytest.raises(ValueError, match="lies inside .*data, an input of this run"):
        filter_corpus(str(tmp_path / "run"), str(tmp_path / "data" / "filtered"), 0.5)
    os.symlink(tmp_path / "elsewhere.parquet", tmp_path / "data" / "link.parquet")
    with pytest.raises(ValueError, match="lies inside .*data, an input of this run"):
        export(str(tmp_path / "run"), str(tmp_path / "data" / "link.parquet"))
    assert os.path.islink(tmp_path / "data" / "link.parquet") and not (tmp_path / "elsewhere.parquet").exists()


def random_audit(n_dialogues=300, visits=2, seed=0):
    """Rows as two ranks log them: every dialogue's turns trained `visits` times, in shuffled steps."""
    import random

    rnd, rows = random.Random(seed), []
    for v in range(visits):
        order = list(range(n_dialogues))
        rnd.shuffle(order)
        for i, d in enumerate(order):
            src = "A" if d % 3 else "B"
            for t in range(1 + d % 4):
                w = 1.0 if rnd.random() < 0.7 else round(rnd.random(), 3)
                rows.append({**row(src, f"d{d}", t, w, 1 + v * n_dialogues + i, z=rnd.gauss(0, 1),
                                   warm=i > 5), "rank": i % 2})
    return rows


def test_the_verdict_in_parts_is_the_verdict_whole(tmp_path):
    """An audit of 1,500 rows spread over 15 parts (every dialogue's turns in one part) gives the same verdict rows, the
    same per-group statistics, the same lowest turns and the same per-dialogue verdicts as read whole."""
    from resure_ds.report.scan import DialogueVerdicts, Lowest, verdict_parts

    log = AuditLog(str(tmp_path), 0, flush_rows=97)  # several segments, as a long run writes them
    log.add(random_audit())
    log.flush()
    whole = list(verdict_parts(str(tmp_path)))
    parts = list(verdict_parts(str(tmp_path), part_rows=100))
    assert len(whole) == 1 and len(parts) == 15 and all(p.num_rows for p in parts)
    for p in parts:  # a dialogue never split between parts
        keys = set(zip(p.column("source").to_pylist(), p.column("dialogue_id").to_pylist()))
        assert not any(keys & set(zip(q.column("source").to_pylist(), q.column("dialogue_id").to_pylist()))
                       for q in parts if q is not p)
    key = lambda r: (r["source"], r["dialogue_id"], r["turn"])  # noqa: E731
    assert sorted(pa.concat_tables(parts).to_pylist(), key=key) == whole[0].to_pylist()

    def accumulate(tables):
        by_src, by_turn, low, dv = GroupStats("source"), GroupStats("turn", cap=2), Lowest(7), DialogueVerdicts(0.5)
        for t in tables:
            for acc in (by_src, by_turn, low, dv):
                acc.add(t)
        return by_src.rows(), by_turn.rows(), low.rows(), dv.done()

    a, b = accumulate(whole), accumulate(parts)
    for x, y in zip(a[:2], b[:2]):
        assert [{k: pytest.approx(v) for k, v in r.items()} for r in x] == y
    assert a[2] == b[2] and len(a[2]) == 7 and [r["weight"] for r in a[2]] == sorted(r["weight"] for r in a[2])
    v = whole[0].to_pylist()
    for d in [f"d{i}" for i in range(301)]:  # d300 was never trained
        src = "A" if int(d[1:]) % 3 else "B"
        low = [r["turn"] for r in v if r["dialogue_id"] == d and r["weight"] < 0.5]
        expect = (any(r["dialogue_id"] == d for r in v), min(low) if low else None)
        assert a[3].lookup(src, d) == b[3].lookup(src, d) == expect
    assert b[3].lookup("A", "d1")[0] and b[3].lookup("B", "d1") == (False, None)  # the source is part of the key


def test_export_and_filter_in_parts_write_what_they_write_whole(tmp_path, monkeypatch):
    """--export and --filter on an audit read in parts: the same rows (export in another order) and the
    same filtered corpus and counts."""
    from resure_ds.report import scan

    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(dialog(f"d{i}", 1 + i % 4)) + "\n" for i in range(320)))
    write_run(tmp_path / "run", [{"path": str(src), "name": "A"}], [r for r in random_audit() if r["source"] == "A"])
    out = {}
    for name, part_rows in (("whole", scan.PART_ROWS), ("parts", 50)):
        monkeypatch.setattr(scan, "PART_ROWS", part_rows)
        monkeypatch.setattr(scan.verdict_parts, "__defaults__", (part_rows,))
        n = export(str(tmp_path / "run"), str(tmp_path / f"{name}.parquet"))
        c = filter_corpus(str(tmp_path / "run"), str(tmp_path / name), 0.5, "turn")
        out[name] = (n, pq.read_table(tmp_path / f"{name}.parquet").to_pylist(), c,
                     (tmp_path / name / "00-A" / "data.jsonl").read_text())
    (n1, v1, c1, f1), (n2, v2, c2, f2) = out["whole"], out["parts"]
    key = lambda r: (r["source"], r["dialogue_id"], r["turn"])  # noqa: E731
    assert n1 == n2 == len(v1) > 400 and v1 == sorted(v2, key=key) and v1 != v2  # parts: grouped, not sorted
    assert {k: v for k, v in c1.items() if k != "outputs"} == {k: v for k, v in c2.items() if k != "outputs"}
    assert f1 == f2 and c1["cut"] > 20 and c1["dropped"] > 20 and c1["not_trained_kept"] == 120  # d0, d3, ... and d300-d319


def test_quantiles_past_the_exact_limit_stay_within_half_a_bin(monkeypatch):
    from resure_ds.report.scan import Quantiles

    monkeypatch.setattr(Quantiles, "EXACT", 1000)
    x = np.random.default_rng(0).standard_normal(50_000) * 3
    x[:5] = [np.nan, np.inf, -80.0, 60.0, 0.0]  # non-finite values left out; values past the range kept in the ends
    q = Quantiles()
    for chunk in np.array_split(x, 37):
        q.add(chunk)
    finite = x[np.isfinite(x)]
    assert q.hist is not None and q.count == len(finite) and (q.lo, q.hi) == (-80.0, 60.0)
    got, exact = q.quantiles([0.0, 0.1, 0.5, 0.9, 1.0]), np.quantile(finite, [0.0, 0.1, 0.5, 0.9, 1.0])
    assert got[0] == -80.0 and got[-1] == 60.0
    assert np.abs(np.array(got[1:4]) - exact[1:4]).max() <= 0.0005 + 1e-9


def test_the_verdict_in_parts_names_a_temporary_folder_it_cannot_write(tmp_path, monkeypatch):
    import tempfile

    from resure_ds.report.scan import verdict_parts

    log = AuditLog(str(tmp_path / "run"), 0)
    log.add(random_audit(n_dialogues=40))
    log.flush()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no" / "such"))
    with pytest.raises(ValueError, match=r"audit's 200 rows are read in parts through temporary files under .*no/such, "
                                         r"which cannot be written there .*point TMPDIR at a folder"):
        list(verdict_parts(str(tmp_path / "run"), part_rows=50))
    assert len(list(verdict_parts(str(tmp_path / "run")))) == 1  # one part: no temporary file


def test_export_and_filter_never_write_into_the_model_reference_or_validation_data(tmp_path):
    """model.path, stats.reference and data.eval are inputs too: --export into the model's folder (its
    weights), onto the validation file or into the reference's folder is refused, nothing changed."""
    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps(dialog("a0", 2)) + "\n")
    model, ref, held = tmp_path / "model", tmp_path / "ref", tmp_path / "eval.jsonl"
    for d in (model, ref):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"weights")
    held.write_text(json.dumps(dialog("e0", 1)) + "\n")
    run = tmp_path / "run"
    write_run(run, [{"path": str(src), "name": "a"}], [row("a", "a0", 1, 0.1, 1)])
    (run / "config.json").write_text(json.dumps({"data": {"train": [{"path": str(src), "name": "a"}], "eval": str(held)},
                                                 "model": {"path": str(model)}, "stats": {"reference": str(ref)}}))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    for target, what in ((model / "model.safetensors", r"lies inside .*model, an input of this run \(model.path\)"),
                         (held, r"is .*eval.jsonl, an input of this run \(data.eval\)"),
                         (ref / "v.parquet", r"lies inside .*ref, an input of this run \(stats.reference\)")):
        with pytest.raises(ValueError, match=what):
            export(str(run), str(target))
    with pytest.raises(ValueError, match=r"lies inside .*model, an input of this run \(model.path\)"):
        filter_corpus(str(run), str(model / "filtered"), 0.5)
    assert (model / "model.safetensors").read_bytes() == b"weights" and (ref / "model.safetensors").read_bytes() == b"weights"
    assert held.read_text() == json.dumps(dialog("e0", 1)) + "\n"


def test_an_output_named_with_a_trailing_slash_beside_the_run_is_written(tmp_path, monkeypatch):
    """newout/ beside the run folder is newout, not the folder that holds the run."""
    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps(dialog("a0", 2)) + "\n")
    write_run(tmp_path / "run", [{"path": str(src), "name": "a"}], [row("a", "a0", 1, 0.9, 1)])
    monkeypatch.chdir(tmp_path)
    c = filter_corpus("run", "newout/", 0.5)
    assert c["kept"] == 1 and os.path.isdir(tmp_path / "newout")


def test_the_report_names_a_damaged_run_file_instead_of_a_traceback(tmp_path):
    """A metrics.jsonl edited in the middle, a config.json cut off or not an object, an audit segment
    replaced by garbage: one error naming the file; a last metrics line cut off by a killed writer is
    left out and the report is made."""
    import subprocess
    import sys

    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps(dialog("a0", 2)) + "\n")
    run = tmp_path / "run"
    write_run(run, [{"path": str(src), "name": "a"}], [row("a", "a0", 1, 0.1, 1)])

    def report(*args):
        return subprocess.run([sys.executable, "-m", "resure_ds.report", str(run), *args], capture_output=True,
                              text=True, timeout=300)

    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')  # a cut-off last line
    out = report("--export", str(tmp_path / "v.parquet"))
    assert out.returncode == 0, out.stderr
    for text, msg in (('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n', "metrics.jsonl line 2: not a JSON object"),
                      ('{"loss": 1.0}\n', "metrics.jsonl: row 1 has no step number"),
                      ('[1]\n', "metrics.jsonl line 1: not a JSON object")):
        (run / "metrics.jsonl").write_text(text)
        out = report("--export", str(tmp_path / "w.parquet"))
        assert out.returncode == 2 and msg in out.stderr and "Traceback" not in out.stderr, out.stderr
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    good = (run / "config.json").read_text()
    for text in (good[:-3], "[1]"):
        (run / "config.json").write_text(text)
        out = report("--filter", str(tmp_path / "f"))
        assert out.returncode == 2 and "config.json: not the run's config" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    (run / "config.json").write_text(good)
    (seg,) = (run / "audit").iterdir()
    seg.write_bytes(b"not parquet")
    out = report("--export", str(tmp_path / "x.parquet"))
    assert out.returncode == 2 and f"{seg}: not a readable audit segment" in out.stderr, out.stderr
    seg.unlink()
    out = report("--export", str(tmp_path / "y.parquet"))
    assert out.returncode == 2 and "has no turn audit" in out.stderr and not (tmp_path / "y.parquet").exists()


def test_a_resume_cuts_metrics_back_past_a_last_line_cut_off_by_a_killed_writer(tmp_path):
    from resure_ds.runtime.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    MetricsLogger(str(tmp_path), 10, 2, 1, []).close()
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
