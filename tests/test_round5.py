"""Round 5 of the noisy-mix study (benchmarks/noisy_mix/round5.py): its statistics against known
values, its noise halves kept apart, and its quick profile end to end (the pipeline and the
results' schema, not the outcome)."""
import json
import math
import os
import random
import subprocess
import sys

import pytest

from benchmarks.noisy_mix.noise5 import _TEMPLATES, canned_pool, cutoff_reply, loop_reply, make_noise
from benchmarks.noisy_mix.stats5 import fieller, holm, paired, t_quantile
from tests.conftest import ROOT


def test_t_quantiles_and_p_values_match_the_tables():
    assert t_quantile(1) == pytest.approx(12.706204736, rel=1e-8)
    assert t_quantile(7) == pytest.approx(2.364624251, rel=1e-8)
    assert t_quantile(30) == pytest.approx(2.042272456, rel=1e-8)
    # 6 diffs of mean 1 and standard error 0.5: t = 2 with 5 df, two-sided p 0.10194
    c = 0.5 * math.sqrt(5)
    d = paired([1 + c * x for x in (1, -1, 1, -1, 1, -1)])
    assert d["mean"] == pytest.approx(1.0) and d["sd"] / math.sqrt(6) == pytest.approx(0.5)
    assert d["p"] == pytest.approx(0.1019395, abs=2e-6)
    assert d["lo"] == pytest.approx(1 - 0.5 * t_quantile(5)) and d["hi"] == pytest.approx(1 + 0.5 * t_quantile(5))
    assert paired([0.2, 0.2])["p"] == 0.0 and paired([0.0, 0.0])["p"] == 1.0  # no spread
    assert paired([0.3])["lo"] is None and paired([])["mean"] is None


def test_holm_adjusts_in_order_and_keeps_none():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, None, 0.01]) == [pytest.approx(0.5), None, pytest.approx(0.02)]
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1, never below an earlier step


def test_fieller_ends_solve_its_equation_and_hold_the_ratio():
    rng = random.Random(3)
    b = [0.10 + rng.gauss(0, 0.02) for _ in range(8)]
    a = [0.6 * y + rng.gauss(0, 0.01) for y in b]
    f = fieller(a, b)
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    saa = sum((x - ma) ** 2 for x in a) / (n - 1) / n
    sbb = sum((y - mb) ** 2 for y in b) / (n - 1) / n
    sab = sum((x - ma) * (y - mb) for x, y in zip(a, b)) / (n - 1) / n
    t2 = t_quantile(n - 1) ** 2
    for r in (f["lo"], f["hi"]):  # (ma - r mb)^2 = t^2 var(a - r b) at both ends
        assert (ma - r * mb) ** 2 == pytest.approx(t2 * (saa - 2 * r * sab + r * r * sbb), rel=1e-9)
    assert f["share"] == pytest.approx(ma / mb) and f["lo"] < f["share"] < f["hi"]
    unresolved = fieller([0.1, -0.1, 0.05], [0.01, -0.02, 0.015])  # the denominator not resolved from 0
    assert unresolved["lo"] is None and unresolved["hi"] is None and unresolved["unbounded"]
    assert "unbounded" not in f
    assert fieller([0.1], [0.2])["share"] is None


def _run(noise, arm, seed, rate, nll=2.0):
    return {"noise": noise, "arm": arm, "seed": seed, "clean_nll": nll,
            "emission": {"any": rate, "canned": rate / 2, "weak": 0.0, "loop": rate / 2},
            "preference": {k: 0.5 for k in ("canned", "weak", "loop", "cutoff", "offtopic")}}


def _grid(arms30: dict, arms0: dict, seeds=range(8)):
    """Made-up runs: arm -> (emission rate at seed 0, its step per seed); the same seed jitter in every arm."""
    jit = [0.01 * ((3 * s) % 5 - 2) for s in range(8)]
    return ([_run(0.3, a, s, r + d * s + jit[s]) for a, (r, d) in arms30.items() for s in seeds]
            + [_run(0.0, a, s, 0.05, 2.0 + d * s + 0.001 * jit[s]) for a, d in arms0.items() for s in seeds])


def test_success_rule_waits_for_complete_cells_and_judges_each_condition():
    """decide: (1) and (2) at 30% first; (3) only for an arm that passed them; an arm short of seeds for
    a condition it reaches is incomplete, and no rule ships until none is."""
    from benchmarks.noisy_mix.round5 import summarise

    det, p = {"primary_kinds": ["canned", "loop"]}, {"seeds": list(range(8))}
    arms30 = {"sft": (0.25, 0.0), "oracle_turn": (0.12, 0.001), "excess_quantile": (0.16, 0.0),
              "excess_quantile_hard": (0.14, 0.0), "two_signals": (0.245, 0.0)}
    runs = _grid(arms30, {"sft": 0.0, "excess_quantile": 0.0005})
    runs += [r for r in _grid({"excess_quantile_hard": (0.14, 0.0)}, {}) if r["seed"] < 7]
    runs = [r for r in runs if not (r["arm"] == "excess_quantile_hard" and r["seed"] == 7)]
    dec = summarise(runs, det, p)["decision"]
    v = dec["per_arm"]
    assert v["excess_quantile"]["state"] == "passes" and v["excess_quantile"]["oracle_share"] > 0.5
    assert v["two_signals"]["state"] == "fails" and v["two_signals"]["emission_below_sft"]  # resolved, but
    assert not v["two_signals"]["half_of_oracle_gain"] and v["two_signals"]["oracle_share"] < 0.1  # small
    assert v["two_signals"]["clean_nll_noninferior_0"] is None  # its 0% runs are not needed
    assert v["excess_quantile_hard"]["state"] == "incomplete" and "7 of 8" in v["excess_quantile_hard"]["why"]
    assert v["two_signals_adaptive"]["state"] == "incomplete"
    assert not dec["final"] and dec["shipped"] is None
    # complete: the hard rule's eighth seed, its 0% runs, and the adaptive arm (resolved worse than sft)
    runs += _grid({"excess_quantile_hard": (0.14, 0.0)}, {"excess_quantile_hard": 0.0}, seeds=[7])
    runs += _grid({}, {"excess_quantile_hard": 0.0}, seeds=range(7))
    runs += _grid({"two_signals_adaptive": (0.30, 0.0)}, {})
    summary = summarise(runs, det, p)
    dec = summary["decision"]
    assert dec["final"] and dec["per_arm"]["excess_quantile_hard"]["state"] == "passes"
    assert dec["per_arm"]["two_signals_adaptive"]["state"] == "fails"
    assert dec["shipped"] == "excess_quantile_hard"  # the larger reduction of the two that pass
    worse = summary["0.3"]["arms"]["two_signals_adaptive"]["oracle_share"]["emission_any"]
    assert worse["share"] is None and worse["n"] == 8  # a resolved increase gets no share of the oracle's gain
    assert list(summary)[:2] == ["0.3", "0.0"]
    # the guardrail: a clean-NLL cost at 0% above the margin fails condition (3)
    runs = [r for r in runs if not (r["noise"] == 0.0 and r["arm"] == "excess_quantile_hard")]
    runs += _grid({}, {"excess_quantile_hard": 0.004})
    v = summarise(runs, det, p)["decision"]["per_arm"]["excess_quantile_hard"]
    assert v["state"] == "fails" and v["clean_nll_noninferior_30"] and not v["clean_nll_noninferior_0"]


def test_the_rule_judges_what_it_can_and_never_ships_on_nothing():
    """No candidate planned: nothing is final, so no "none" is declared. A candidate that fails (1) on
    all seeds fails though the oracle lacks a seed; one that passes (1) waits for the oracle's seeds
    and for clean NLL on all seeds at 30% as at 0%."""
    from benchmarks.noisy_mix.round5 import summarise

    det, p = {"primary_kinds": ["canned", "loop"]}, {"seeds": list(range(8))}
    runs = _grid({"sft": (0.25, 0.0), "oracle_turn": (0.12, 0.001), "two_signals": (0.30, 0.0),
                  "excess_quantile": (0.16, 0.0)}, {"sft": 0.0, "excess_quantile": 0.0})
    dec = summarise(runs, det, p, ())["decision"]
    assert dec == {"per_arm": {}, "final": False, "shipped": None}
    short = [r for r in runs if not (r["arm"] == "oracle_turn" and r["seed"] == 7)]
    v = summarise(short, det, p, ("two_signals", "excess_quantile"))["decision"]["per_arm"]
    assert v["two_signals"]["state"] == "fails" and v["two_signals"]["half_of_oracle_gain"] is None
    assert v["excess_quantile"]["state"] == "incomplete" and "oracle share has 7 of 8" in v["excess_quantile"]["why"]
    no_nll = [dict(r, clean_nll=None) if r["arm"] == "excess_quantile" and r["noise"] == 0.3 and r["seed"] == 3
              else r for r in runs]
    v = summarise(no_nll, det, p, ("excess_quantile",))["decision"]["per_arm"]["excess_quantile"]
    assert v["state"] == "incomplete" and v["why"] == "clean NLL at 30% has 7 of 8 seeds"


def test_the_study_is_blind_until_its_first_cell_is_complete():
    from benchmarks.noisy_mix.round5 import PROFILES, blind_reason, plan, run_name

    p = PROFILES["cpu"]
    done = {run_name(s): {} for s in plan(p) if s["noise"] == 0.3 and s["seed"] < 7}
    assert blind_reason(done, p) == "the 30% cell has 70 of its 80 runs"
    done.update({run_name(s): {} for s in plan(p) if s["noise"] == 0.3})
    assert blind_reason(done, p) is None  # the 0% cell may still be running


def test_one_pass_writes_a_log_and_a_worker_publishes_nothing(tmp_path, monkeypatch):
    from benchmarks.noisy_mix.round5 import main, own_log

    log = str(tmp_path / "runs-0of2.jsonl")
    held = own_log(log)
    with pytest.raises(SystemExit, match="being written by another pass that makes runs"):
        own_log(log)
    held.close()
    own_log(log).close()  # free again once the first pass ends
    monkeypatch.setattr(sys, "argv", ["round5.py", "--worker", "0/2", "--publish", str(tmp_path / "pub")])
    with pytest.raises(SystemExit, match="--publish with --worker"):
        main()


@pytest.mark.slow  # one short training, in a process of its own
def test_a_run_stopped_before_its_last_step_is_named_not_measured(tmp_path, tiny_model_path):
    """A stop (here train.stop_after; in the grid, a signal) ends the training without a model: the
    worker says so, instead of failing later on the missing export."""
    from tests.dist import free_port

    code = (f"import sys; sys.path.insert(0, {ROOT!r})\n"
            "from benchmarks.noisy_mix.corrupt import write_jsonl\n"
            "from benchmarks.noisy_mix.round4 import load_splits\n"
            "from benchmarks.noisy_mix.run import train_one\n"
            f"data = {str(tmp_path / 'train.jsonl')!r}\n"
            "write_jsonl(data, load_splits('chitchat')['train'][:8])\n"
            "p = dict(max_length=64, micro_batch_size=4, lr=1e-3, min_count=4)\n"
            f"train_one('halted', data, {tiny_model_path!r}, p, 'sft', 2, 0, {{'train.stop_after': '1'}}, "
            f"{str(tmp_path)!r})\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    assert out.returncode == 1, out.stderr[-3000:]
    assert "run halted stopped before its step 2 (a stop signal): it has no model to measure" in out.stderr
    assert not (tmp_path / "halted" / "export").exists()


def test_a_record_cut_short_is_cut_before_the_next_and_a_merged_line_is_named(tmp_path):
    from benchmarks.noisy_mix.round5 import append_record, cut_unended_line, made_runs

    log = tmp_path / "runs-0of2.jsonl"
    append_record(str(log), {"name": "n0.3-sft-seed0", "x": 1})
    with open(log, "a") as f:
        f.write('{"name": "n0.3-clean-se')  # killed while writing
    cut_unended_line(str(log))
    append_record(str(log), {"name": "n0.3-clean-seed0", "x": 2})
    assert sorted(made_runs(str(tmp_path))) == ["n0.3-clean-seed0", "n0.3-sft-seed0"]
    with open(log, "a") as f:  # written on without the cut: one line that is not a record
        f.write('{"name": "n0.3-oracle_turn-se{"name": "n0.3-oracle_turn-seed0"}\n')
    with pytest.raises(SystemExit, match=r"runs-0of2.jsonl, line 3: not a run's record"):
        made_runs(str(tmp_path))
    log.write_text(json.dumps({"name": "n0.3-sft-seed0", "x": 1}) + "\n")
    (tmp_path / "runs-1of2.jsonl").write_text(json.dumps({"name": "n0.3-sft-seed0", "x": 3}) + "\n")
    with pytest.raises(SystemExit, match="two different records of it"):
        made_runs(str(tmp_path))


def test_runs_judged_by_another_detector_stand_only_if_it_judges_alike(tmp_path):
    """A run recorded without this study's detector hash has its saved replies judged again: it stands
    if every verdict is the same, and the tables stop, naming the run, if one differs or the replies are gone."""
    from benchmarks.noisy_mix.noise5 import Detector
    from benchmarks.noisy_mix.round5 import recheck_detector

    rng = random.Random(0)
    human = ["I went there with my sister last week", "not really, I prefer tea", "my dog loves the park"]
    pairs = [("how are you", rng.choice(human)) for _ in range(20)] + [("how are you", "ok ok ok ok ok ok ok ok")] * 20
    det = Detector().fit(pairs, ["human"] * 20 + ["loop"] * 20)
    ctx = {"contexts": [{"id": f"c{i}", "messages": [{"role": "user", "content": "how are you"}]} for i in range(4)]}
    replies = ["my dog loves the park", "ok ok ok ok ok ok ok ok", "not really", "ok ok ok ok ok ok ok ok"]
    pred = det.predict([("how are you", r) for r in replies])
    assert pred.count("loop") == 2
    (tmp_path / "runs" / "old").mkdir(parents=True)
    saved = tmp_path / "runs" / "old" / "replies.jsonl"
    saved.write_text("".join(json.dumps({"id": f"c{i}", "reply": r, "detector": x}) + "\n"
                             for i, (r, x) in enumerate(zip(replies, pred))))
    sha = det.state()["sha256"]
    runs = [{"name": "old"}, {"name": "new", "detector_sha256": sha}]
    assert recheck_detector(runs, det, {"sha256": sha}, ctx, str(tmp_path)) == ["old"]
    flipped = pred[:3] + ["human" if pred[3] != "human" else "loop"]
    saved.write_text("".join(json.dumps({"id": f"c{i}", "reply": r, "detector": x}) + "\n"
                             for i, (r, x) in enumerate(zip(replies, flipped))))
    with pytest.raises(SystemExit, match="old: .* judges 1 of its 4 replies otherwise"):
        recheck_detector(runs, det, {"sha256": sha}, ctx, str(tmp_path))
    saved.unlink()
    with pytest.raises(SystemExit, match="old: .* missing"):
        recheck_detector([{"name": "old", "detector_sha256": "0" * 64}], det, {"sha256": sha}, ctx, str(tmp_path))


def test_a_detector_fitted_before_is_adopted_once_and_never_swapped(tmp_path):
    from benchmarks.noisy_mix.round5 import adopt_detector

    a, b, out = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "study"
    a.write_bytes(b"weights a")
    b.write_bytes(b"weights b")
    out.mkdir()
    adopt_detector(str(a), str(out))
    assert (out / "detector.pt").read_bytes() == b"weights a"
    adopt_detector(str(a), str(out))  # the same again: nothing to do
    with pytest.raises(SystemExit, match="holds another detector"):
        adopt_detector(str(b), str(out))
    with pytest.raises(SystemExit, match="no such file"):
        adopt_detector(str(tmp_path / "none.pt"), str(out))
    assert (out / "detector.pt").read_bytes() == b"weights a"


def test_the_gpu_profile_runs_the_rule_the_cpu_grid_shipped_or_came_closest(tmp_path):
    from benchmarks.noisy_mix.round5 import gpu_rule, summarise

    path = tmp_path / "results.json"
    assert gpu_rule(str(path)) == "two_signals_adaptive"  # no tables yet
    det, p = {"primary_kinds": ["canned", "loop"]}, {"seeds": list(range(8))}
    arms = {"sft": (0.25, 0.0), "oracle_turn": (0.12, 0.0), "excess_quantile": (0.24, 0.0), "two_signals": (0.22, 0.0)}
    summary = summarise(_grid(arms, {}), det, p)
    assert summary["decision"]["shipped"] is None
    path.write_text(json.dumps({"summary": summary}))
    assert gpu_rule(str(path)) == "two_signals_adaptive"  # tables of a cell part-way through: the default
    path.write_text(json.dumps({"summary": summary, "first_cell_complete": True}))
    assert gpu_rule(str(path)) == "two_signals"  # none shipped: the largest reduction
    summary["decision"]["shipped"] = "excess_quantile"
    path.write_text(json.dumps({"summary": summary, "first_cell_complete": True}))
    assert gpu_rule(str(path)) == "excess_quantile"


def test_publishing_into_the_study_folder_itself_is_refused(tmp_path):
    from benchmarks.noisy_mix.round5 import publish

    (tmp_path / "results.md").write_text("tables")
    with pytest.raises(SystemExit, match="that is the study folder itself"):
        publish(str(tmp_path), str(tmp_path / "." / ""), [])
    assert (tmp_path / "results.md").read_text() == "tables"


def test_publishing_again_removes_an_earlier_publishs_runs_files(tmp_path):
    from benchmarks.noisy_mix.round5 import publish

    out, dest = tmp_path / "study", tmp_path / "published"
    out.mkdir()
    dest.mkdir()
    (out / "runs-0of1.jsonl").write_text('{"name": "a"}\n')
    (dest / "runs-0of2.jsonl").write_text('{"name": "old"}\n')  # an earlier split of the workers
    (dest / "runs-1of2.jsonl").write_text('{"name": "old"}\n')
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds a record that is not round 5's"):  # runs files, no results.json
        publish(str(out), str(dest), [])
    (dest / "results.json").write_text(json.dumps({"profile": "cpu", "runs": []}))  # another round's record
    with pytest.raises(SystemExit, match="holds a record that is not round 5's"):
        publish(str(out), str(dest), [])
    assert len(list(dest.glob("runs*.jsonl"))) == 2
    (dest / "results.json").write_text(json.dumps({"study": "round5", "runs": []}))
    publish(str(out), str(dest), [])
    assert sorted(p.name for p in dest.glob("runs*.jsonl")) == ["runs-0of1.jsonl"]
    assert (dest / "runs-0of1.jsonl").read_text() == '{"name": "a"}\n'
    assert (dest / "notes.txt").read_text() == "mine"


GRID = {"profile": "cpu", "dtype": "bf16"}


def _study_with_runs(folder, names, dtype="bf16"):
    folder.mkdir(parents=True)
    with open(folder / "runs-0of2.jsonl", "w") as f:
        for i, name in enumerate(names):
            f.write(json.dumps({"name": name, "dtype": dtype, "emission": {"any": 0.1 * i}}) + "\n")
            (folder / "runs" / name).mkdir(parents=True)
            (folder / "runs" / name / "replies.jsonl").write_text(json.dumps({"id": i, "reply": "hi"}) + "\n")


def test_kept_runs_carry_a_grid_to_a_new_machine_and_two_records_of_a_run_are_refused(tmp_path):
    from benchmarks.noisy_mix import keep5

    old, new, keep = tmp_path / "old-machine", tmp_path / "new-machine", tmp_path / "grid[cpu]"  # a glob character
    _study_with_runs(old, ["n0.3-sft-seed0", "n0.3-resure-seed0"])
    with open(old / "runs-1of2.jsonl", "w") as f:  # the other worker is writing its first record
        f.write('{"name": "n0.3-sft-se')
    assert keep5.save(str(keep), str(old), GRID) == ["n0.3-resure-seed0", "n0.3-sft-seed0"]
    assert keep5.save(str(keep), str(old), GRID) == []
    assert sorted(p.name for p in keep.iterdir()) == [
        "grid.json", "n0.3-resure-seed0.json", "n0.3-resure-seed0.replies.jsonl.gz", "n0.3-sft-seed0.json",
        "n0.3-sft-seed0.replies.jsonl.gz"]
    new.mkdir()
    assert keep5.restore(str(keep), str(new), GRID) == ["n0.3-resure-seed0", "n0.3-sft-seed0"]
    assert keep5.restore(str(keep), str(new), GRID) == []
    for name in ("n0.3-sft-seed0", "n0.3-resure-seed0"):
        assert (new / "runs" / name / "replies.jsonl").read_text() == (old / "runs" / name / "replies.jsonl").read_text()
    assert keep5.records(str(new)) == keep5.records(str(old))
    assert keep5.restore(str(tmp_path / "none"), str(new), GRID) == []  # no kept folder yet: nothing taken
    for other in ({"profile": "quick", "dtype": "bf16"}, {"profile": "cpu", "dtype": "fp32"}):
        for step in (keep5.save, keep5.restore):
            with pytest.raises(SystemExit, match="keeps a grid of .* share one profile and precision"):
                step(str(keep), str(new), other)
    with pytest.raises(SystemExit, match="that is the study folder itself"):
        keep5.save(str(new), str(new), GRID)
    with open(new / "runs-0of2.jsonl", "a") as f:  # the new machine ran seed 0's sft again, with another result
        f.write(json.dumps({"name": "n0.3-sft-seed0", "dtype": "bf16", "emission": {"any": 0.5}}) + "\n")
    for step in (keep5.save, keep5.restore):
        with pytest.raises(SystemExit, match="run n0.3-sft-seed0: two different records"):
            step(str(keep), str(new), GRID)
    (new / "runs-kept.jsonl").unlink()  # the kept record is not in the study folder: the two folders differ
    for step in (keep5.save, keep5.restore):
        with pytest.raises(SystemExit, match="run n0.3-sft-seed0: .* differ"):
            step(str(keep), str(new), GRID)
    (keep / "n0.3-sft-seed0.json").rename(keep / "renamed.json")
    with pytest.raises(SystemExit, match="renamed.json: the record names run 'n0.3-sft-seed0'"):
        keep5.restore(str(keep), str(new), GRID)


def test_kept_replies_lost_or_swapped_by_hand_are_named_or_made_again(tmp_path):
    from benchmarks.noisy_mix import keep5

    study, keep, new = tmp_path / "study", tmp_path / "kept", tmp_path / "new"
    _study_with_runs(study, ["n0.3-sft-seed1", "n0.3-clean-seed1"])
    keep5.save(str(keep), str(study), GRID)
    (keep / "n0.3-sft-seed1.replies.jsonl.gz").unlink()  # lost by hand: the study folder still has them
    assert keep5.save(str(keep), str(study), GRID) == ["n0.3-sft-seed1"]
    gz = (keep / "n0.3-sft-seed1.replies.jsonl.gz").read_bytes()
    (keep / "n0.3-sft-seed1.replies.jsonl.gz").write_bytes((keep / "n0.3-clean-seed1.replies.jsonl.gz").read_bytes())
    with pytest.raises(SystemExit, match="n0.3-sft-seed1.replies.jsonl.gz: not the replies its run"):
        keep5.restore(str(keep), str(new), GRID)
    (keep / "n0.3-sft-seed1.replies.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(SystemExit, match="n0.3-sft-seed1.replies.jsonl.gz: .*cannot be read"):
        keep5.restore(str(keep), str(new), GRID)
    assert not (new / "runs-kept.jsonl").exists()
    assert not (new / "runs").exists() or not any((new / "runs").iterdir())  # no folder left without its run
    (keep / "stray.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="stray.json: not a kept run"):
        keep5.kept_runs(str(keep))


def test_a_kept_record_whose_replies_are_gone_is_named_and_precisions_are_not_mixed(tmp_path):
    from benchmarks.noisy_mix import keep5

    _study_with_runs(tmp_path / "study", ["n0.3-sft-seed1"])
    (tmp_path / "study" / "runs" / "n0.3-sft-seed1" / "replies.jsonl").unlink()
    with pytest.raises(SystemExit, match="n0.3-sft-seed1: its record is in .* but its replies .* are missing"):
        keep5.save(str(tmp_path / "kept"), str(tmp_path / "study"), GRID)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["grid.json"]
    _study_with_runs(tmp_path / "fp32", ["n0.3-sft-seed2"], dtype="fp32")  # a worker started with --dtype fp32
    with pytest.raises(SystemExit, match="n0.3-sft-seed2 .* was made in fp32, this grid in bf16"):
        keep5.save(str(tmp_path / "kept"), str(tmp_path / "fp32"), GRID)


def test_a_grid_continues_only_in_the_precision_its_kept_runs_used(tmp_path):
    from benchmarks.noisy_mix import keep5
    from benchmarks.noisy_mix.round5 import grid_dtype

    keep = tmp_path / "kept"
    assert grid_dtype("fp32", str(keep)) == "fp32"  # nothing kept yet: any precision starts a grid
    _study_with_runs(tmp_path / "study", ["n0.3-sft-seed0"], dtype="fp32")
    keep5.save(str(keep), str(tmp_path / "study"), {"profile": "cpu", "dtype": "fp32"})
    assert grid_dtype("fp32", str(keep)) == "fp32"
    assert grid_dtype("auto", str(keep)) == "fp32"  # on any machine: the kept grid's precision
    with pytest.raises(SystemExit, match="trained and sampled in fp32, --dtype asks for bf16.*--dtype fp32"):
        grid_dtype("bf16", str(keep))
    assert grid_dtype("auto", None) in ("bf16", "fp32")


def test_the_seeds_arms_share_one_arithmetic_and_a_run_made_otherwise_is_refused():
    from benchmarks.noisy_mix.round5 import PROFILES, check_matmul, matmul_of, plan, run_name

    cpu = {**PROFILES["cpu"], "dtype": "bf16"}
    by_seed = {}
    for spec in plan(cpu):
        by_seed.setdefault((spec["noise"], spec["seed"]), set()).add(matmul_of(spec, cpu))
    assert all(len(m) == 1 for m in by_seed.values())  # never two arithmetics within a seed's arms
    assert {k for k, m in by_seed.items() if m == {"native"}} == {(0.3, 0), (0.3, 1)}
    assert matmul_of({"noise": 0.0, "seed": 0}, cpu) == "fp32"
    assert matmul_of({"noise": 0.3, "seed": 0}, {**cpu, "dtype": "fp32"}) == "native"  # fp32 grid: no bf16
    assert matmul_of({"noise": 0.3, "seed": 5}, {**PROFILES["gpu"], "dtype": "bf16"}) == "native"
    seed0, seed2 = {"noise": 0.3, "arm": "sft", "seed": 0}, {"noise": 0.3, "arm": "sft", "seed": 2}
    old = {run_name(seed0): {"name": run_name(seed0)},  # records from before the field: native
           run_name(seed2): {"name": run_name(seed2), "bf16_matmul": "fp32"}}
    check_matmul(old, plan(cpu), cpu)
    old[run_name(seed2)] = {"name": run_name(seed2)}  # a seed-2 run made with the native kernels
    with pytest.raises(SystemExit, match="run n0.3-sft-seed2 computed its bf16 products native, the grid's "
                                         "rule says fp32.*superseded"):
        check_matmul(old, plan(cpu), cpu)


def test_noise_halves_are_disjoint_and_canned_has_two_hundred_strings():
    train, probe = canned_pool("train"), canned_pool("probe")
    assert len(set(train)) == len(train) == 100 and len(set(probe)) == len(probe) == 100
    assert not set(train) & set(probe)
    assert not set(_TEMPLATES["train"]) & set(_TEMPLATES["probe"])
    rng = random.Random(0)
    msgs = [{"role": "user", "content": "I am tired of my job"}, {"role": "assistant", "content": "Oh no, why?"}]
    for _ in range(50):
        assert make_noise("canned", msgs, 1, "probe", [], rng) in probe
        assert make_noise("offtopic", msgs, 1, "train", ["Oh no, why?", "Nice weather."], rng) == "Nice weather."
    text = "well I think that the weather here is nice today"
    loop = loop_reply(text, rng)
    assert loop.count(loop.split()[0]) >= 3 and text.startswith(loop.split()[0])
    cut = cutoff_reply(text, rng)
    assert text.startswith(cut) and len(cut.split()) < len(text.split())
    with pytest.raises(ValueError, match="unknown noise kind"):
        make_noise("loud", msgs, 1, "train", [], rng)


ARMS = ("sft", "clean", "oracle_turn", "offline_filter", "two_signals_adaptive")


@pytest.mark.long
def test_quick_profile_pipeline_and_schema(tmp_path, smollm2_path):
    """Five arms on two seeds at 30% and two arms at 0%, on the tiny model: every run recorded with
    the detector's hash; the same batches for every arm; no tables while the 30% cell has runs left,
    unless --unblind; paired intervals, Holm, the oracle's share and the success rule's verdict written
    over the whole plan; the same command again trains nothing."""
    from benchmarks.noisy_mix.round5 import CANDIDATES, PROFILES, plan

    def study(port, *more, only=ARMS):
        return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "noisy_mix", "round5.py"),
                               "--profile", "quick", "--out", str(tmp_path), "--only", ",".join(only), *more],
                              cwd=ROOT, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "MASTER_PORT": str(port)})
    (tmp_path / "runs.jsonl").write_text('{"name": "n0.3-sft-seed0", "noi')  # a record cut short by a kill
    out = study(29671)
    assert out.returncode == 1 and "no tables written: the 30% cell has 10 of its 20 runs" in out.stderr, (
        out.stderr[-4000:])
    assert "runs.jsonl: cut its last line, a record without its end (31 bytes" in out.stdout
    assert not (tmp_path / "results.json").exists() and "emission" not in out.stdout  # blind: no outcome printed
    out = study(29673, "--unblind")
    assert out.returncode == 0, out.stderr[-4000:]
    assert " done (" not in out.stdout  # every run was made: none again
    res = json.loads((tmp_path / "results.json").read_text())
    runs = res["runs"]
    assert {(r["noise"], r["arm"], r["seed"]) for r in runs} == (
        {(0.3, a, s) for a in ARMS for s in (0, 1)} | {(0.0, a, s) for a in ("sft", "two_signals_adaptive")
                                                      for s in (0, 1)})
    det = res["detector"]
    assert len(det["sha256"]) == 64 and all(r["detector_sha256"] == det["sha256"] for r in runs)
    assert set(det["primary_kinds"]) <= {"canned", "weak", "loop"}
    for r in runs:  # one epoch of the same sample: every arm trains the same steps and sees the same turns
        twin = next(x for x in runs if x["noise"] == r["noise"] and x["seed"] == r["seed"] and x["arm"] == "sft")
        assert r["steps"] == twin["steps"] and r["turns"] == twin["turns"] and r["corrupted"] == twin["corrupted"]
        assert 0.0 <= r["emission"]["any"] <= 1.0 and r["clean_nll"] > 0
        assert set(r["preference"]) == {"canned", "weak", "loop", "cutoff", "offtopic"}
    assert all(r["corrupted"] > 0 for r in runs if r["noise"] == 0.3)
    assert all(r["corrupted"] == 0 for r in runs if r["noise"] == 0.0)
    adaptive = [r for r in runs if r["arm"] == "two_signals_adaptive" and r["noise"] == 0.3]
    assert all(r["removed_share"] > 0 for r in adaptive)  # the rule removed weight
    cell = res["summary"]["0.3"]["arms"]
    assert set(cell) == set(ARMS)
    for arm, c in cell.items():
        d = c["minus_sft"]["emission_any"]
        assert d["n"] == 2 and d["lo"] <= d["mean"] <= d["hi"], arm
        assert set(c["holm"]) == {f"emission_{k}" for k in det["primary_kinds"]} or arm == "sft"
        assert "emission_any" in c["oracle_share"]
    verdict = res["summary"]["decision"]["per_arm"]["two_signals_adaptive"]
    assert set(verdict) >= {"passes", "emission_below_sft", "half_of_oracle_gain", "clean_nll_noninferior_30",
                            "clean_nll_noninferior_0"}
    assert verdict["passes"] == all(verdict[k] for k in ("emission_below_sft", "half_of_oracle_gain",
                                                         "clean_nll_noninferior_30", "clean_nll_noninferior_0"))
    assert verdict["state"] in ("passes", "fails")  # both seeds at both rates: judged
    # --only made one candidate's runs: the plan's other three are judged incomplete, so nothing is final
    dec = res["summary"]["decision"]
    assert set(dec["per_arm"]) == set(CANDIDATES) and not dec["final"] and dec["shipped"] is None
    assert all(dec["per_arm"][a]["state"] == "incomplete" for a in CANDIDATES if a != "two_signals_adaptive")
    assert len(res["not_run"]) == len(plan(PROFILES["quick"])) - len(runs) and not res["first_cell_complete"]
    big = cell["two_signals_adaptive"]["largest_share_over_configured"]
    assert big["ratio"] == max(v for r in adaptive for v in r["final_share_over_configured"].values())
    assert big["source"] in res["sources"] and big["seed"] in (0, 1)
    assert f"The largest in any run: {big['ratio']:.2f} ({big['source']}, seed {big['seed']})" in (
        tmp_path / "results.md").read_text()
    assert len(res["code"]["commit"]) == 40 and isinstance(res["code"]["changed"], list) and res["study"] == "round5"
    assert "### Noise 30%" in (tmp_path / "results.md").read_text()
    assert os.path.getsize(tmp_path / "round5.png") > 5000
    again = study(29672, "--publish", str(tmp_path / "published"), "--unblind", only=(*ARMS, "two_signals"))
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"{len(runs)} of {len(plan(PROFILES['quick']))} runs" in again.stdout and " done (" not in again.stdout
    assert "4 of this pass's runs left" in again.stdout  # --publish made none of two_signals' runs
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == runs
    pub = tmp_path / "published"
    assert json.loads((pub / "results.json").read_text())["runs"] == runs and (pub / "results.md").exists()
    assert (pub / "detector.json").exists() and (pub / "round5.png").exists() and list(pub.glob("runs*.jsonl"))
    import gzip
    with gzip.open(pub / "replies.jsonl.gz", "rt", encoding="utf-8") as f:
        replies = [json.loads(ln) for ln in f]
    assert {x["run"] for x in replies} == {r["name"] for r in runs}
    assert len(replies) == len(runs) * res["settings"]["contexts"]
    assert all("detector" in x and "reply" in x for x in replies)


def test_a_run_made_otherwise_than_the_rule_goes_neither_into_the_kept_grid_nor_out_of_it(tmp_path):
    from benchmarks.noisy_mix import keep5
    from benchmarks.noisy_mix.round5 import PROFILES, made_matmul, take_kept

    cpu = {**PROFILES["cpu"], "dtype": "bf16"}
    study, keep = tmp_path / "study", tmp_path / "kept"
    _study_with_runs(study, ["n0.3-sft-seed2"])  # made with the native kernels, before the rule
    with open(study / "runs-0of2.jsonl", "a") as f:
        f.write('{"name": "n0.3-clean-se')  # the other worker is writing its record
    with pytest.raises(SystemExit, match="n0.3-sft-seed2 computed its bf16 products native"):
        take_kept(str(keep), str(study), GRID, cpu)
    assert not keep.exists()  # nothing was copied into the kept grid first
    (study / "runs-0of2.jsonl").write_text(json.dumps({"name": "n0.3-sft-seed2", "dtype": "bf16",
                                                       "bf16_matmul": "fp32"}) + "\n")
    take_kept(str(keep), str(study), GRID, cpu)
    assert sorted(keep5.kept_runs(str(keep))) == ["n0.3-sft-seed2"]
    # a run folder's arithmetic, as the offline filter's sft model is chosen by it
    run = study / "runs" / "n0.3-sft-seed2"
    assert made_matmul(str(run)) == "unknown"
    (run / "config.json").write_text(json.dumps({"model": {"dtype": "bf16"}}))
    assert made_matmul(str(run)) == "native"
    (run / "config.json").write_text(json.dumps({"model": {"dtype": "bf16", "bf16_matmul": "fp32"}}))
    assert made_matmul(str(run)) == "fp32"


def test_the_base_outcomes_are_kept_once_and_taken_only_under_their_detector_and_products(tmp_path):
    import gzip

    from benchmarks.noisy_mix import keep5

    old, new, keep, det = tmp_path / "old", tmp_path / "new", tmp_path / "kept", "d" * 64
    old.mkdir()
    base = {"clean_nll": 1.5, "emission": {"any": 0.2}, "bf16_matmul": "fp32"}
    (old / "base.json").write_text(json.dumps(base))
    (old / "base-replies.jsonl").write_text('{"reply": "hi", "detector": "human"}\n')
    assert keep5.save_base(str(keep), str(old), det) and not keep5.save_base(str(keep), str(old), det)  # once
    assert keep5.kept_runs(str(keep)) == {}  # DIR/base/ holds no run
    assert not keep5.restore_base(str(keep), str(old), det, "fp32")  # a study folder's own are never replaced
    new.mkdir()
    for sha, matmul in (("e" * 64, "fp32"), (det, "native")):  # another detector, other products
        with pytest.raises(SystemExit, match="made with detector dddddddddddd and fp32 products"):
            keep5.restore_base(str(keep), str(new), sha, matmul)
    assert not (new / "base.json").exists()
    assert keep5.restore_base(str(keep), str(new), det, "fp32")
    assert json.loads((new / "base.json").read_text()) == base
    assert (new / "base-replies.jsonl").read_text() == (old / "base-replies.jsonl").read_text()
    third = tmp_path / "third"
    (keep / "base" / "base-replies.jsonl.gz").write_bytes(gzip.compress(b'{"reply": "other"}\n'))  # by hand
    with pytest.raises(SystemExit, match="not the replies kept with"):
        keep5.restore_base(str(keep), str(third), det, "fp32")
    (keep / "base" / "base-replies.jsonl.gz").write_bytes(b"\x1f\x8b cut")
    with pytest.raises(SystemExit, match="base-replies.jsonl.gz: .*the base outcomes are made again"):
        keep5.restore_base(str(keep), str(third), det, "fp32")
    assert sorted(p.name for p in third.iterdir()) == [".keep.lock"]  # nothing taken half
    (keep / "base" / "base.json").write_text("[1, 2]")  # edited by hand
    with pytest.raises(SystemExit, match="base.json: not kept base outcomes .*they are made again"):
        keep5.restore_base(str(keep), str(third), det, "fp32")
    with pytest.raises(SystemExit, match="that is the study folder itself"):
        keep5.save_base(str(old), str(old), det)
