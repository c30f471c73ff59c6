"""Reference-aware statistics (stats.reference): the scores beside the shards, the refusal of a
corpus without them, and real 2-rank runs whose statistics track the excess loss exactly, resumed
like a straight run."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from resure_ds.config import load_config
from resure_ds.data.collate import collate
from resure_ds.data.loader import Corpus
from resure_ds.data.pipeline import TrainingData
from resure_ds.data.prepare import UNSCORED, ensure_prepared
from resure_ds.data.prepare import main as prepare_main
from resure_ds.data.reference import ReferenceLosses, model_fingerprint
from resure_ds.errors import DataError
from resure_ds.eval.offline import load_model, turn_scores
from resure_ds.eval.score import score_all
from resure_ds.testing import random_llama
from resure_ds.stats.histogram import LossHistogram
from resure_ds.stats.method import Method
from resure_ds.stats.turns import TurnLosses
from tests.conftest import ROOT
from tests.e2e_common import COMMON, EXIT_RESUME, assert_same_training, audit, launch, metrics
from tests.test_prepare import chitchat_jsonl
from tests.welford_ref import welford_pass

ARGS = ["data.max_length=96", "data.skip_invalid=true", "model.dtype=fp32", "stats.signals=[excess]"]


def config(model, data, prepared, *extra):
    return load_config(None, [f"model.path={model}", f"data.train={data}", f"data.prepared_dir={prepared}",
                              *ARGS, *extra])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_path, tokenizer):
    """Three JSONL files of 20 real chitchat dialogues each (over 150 trained turns, some split into
    windows), prepared and scored once by the tiny model. Few: each of the module's scoring passes runs
    the tiny model's 49,152-word LM head over every token on the CPU."""
    root = tmp_path_factory.mktemp("reference")
    chitchat_jsonl(root / "data", per_file=20)
    c = config(tiny_model_path, str(root / "data"), root / "prep")
    [key] = score_all(c, progress=False)
    [p] = ensure_prepared(c, tokenizer, tiny_model_path, progress=False)
    return root, c, p, key


def test_scores_are_each_turns_loss_on_the_trained_tokens(corpus, tiny_model_path):
    """Every trained turn's reference loss equals resure_ds.eval's per-turn loss of the same model on
    the same dialogues (split into the same rows at data.max_length), and only trained turns have one."""
    root, c, p, key = corpus
    ref = ReferenceLosses(p.folder, key)
    assert p.manifest["counts"]["overflow"]["split"] > 0  # every window of a long dialogue is scored
    model, tok = load_model(tiny_model_path)
    want = {(d, t): s / n for d, t, s, n in turn_scores(model, tok, str(root / "data"), max_length=96)}
    ids = Corpus([p.folder]).sources[0].dialogue_ids()
    got = {}
    for i, d in enumerate(ids):
        for t, v in enumerate(ref.turns(i).tolist()):
            if not math.isnan(v):
                got[(d, t)] = v
    assert set(got) == set(want) and len(got) > 150, len(got)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5), k
    meta = ref.meta
    assert meta["dtype"] == "fp32" and meta["turns"] == len(got) and meta["rows"] == len(ids)


def test_a_second_score_is_a_cache_hit_and_another_reference_is_another_key(corpus, tiny_model_path, tmp_path):
    root, c, p, key = corpus
    folder = ReferenceLosses(p.folder, key).folder
    before = os.stat(os.path.join(folder, "turn_loss.npy")).st_mtime_ns
    assert score_all(c, progress=False) == [key]
    assert os.stat(os.path.join(folder, "turn_loss.npy")).st_mtime_ns == before
    other = str(tmp_path / "other")
    random_llama(tiny_model_path, other, seed=1)  # the same shape, other weights
    assert model_fingerprint(other) != model_fingerprint(tiny_model_path)
    c2 = config(tiny_model_path, str(root / "data"), root / "prep", f"stats.reference={other}")
    with pytest.raises(DataError, match="no reference losses of .*other.* resure-ds score"):
        TrainingData(c2, load_model(tiny_model_path)[1], tiny_model_path, 0)


def test_an_unscored_corpus_is_refused_with_the_command_that_scores_it(tmp_path, tiny_model_path, tokenizer):
    chitchat_jsonl(tmp_path / "data", n_files=1, per_file=30)
    args = [f"model.path={tiny_model_path}", f"data.train={tmp_path / 'data'}", f"data.prepared_dir={tmp_path / 'p'}",
            *ARGS]
    c = load_config(None, args)
    with pytest.raises(DataError) as e:
        TrainingData(c, tokenizer, tiny_model_path, 0)
    [p] = ensure_prepared(c, tokenizer, tiny_model_path, progress=False)
    assert p.folder in str(e.value) and "resure-ds score RECIPE" in str(e.value)
    # launch/train.sh asks prepare whether scores are missing (status 3), then scores
    assert prepare_main(["--check-reference", *args]) == UNSCORED
    assert prepare_main(["--check-reference", *args[:-1]]) == 0  # no excess signal: nothing to score
    score_all(c, progress=False)
    assert prepare_main(["--check-reference", *args]) == 0
    assert TrainingData(c, tokenizer, tiny_model_path, 0).references


def test_damaged_or_mismatched_scores_are_named(corpus, tmp_path):
    root, c, p, key = corpus
    copy = tmp_path / "copy"
    shutil.copytree(p.folder, copy)
    ref = os.path.join(copy, f"reference-{key}")
    offsets = np.load(os.path.join(ref, "offsets.npy"))
    np.save(os.path.join(ref, "offsets.npy"), offsets[:-5])
    with pytest.raises(DataError, match="reference losses for .* rows, the prepared folder holds"):
        Corpus([str(copy)], [key])
    np.save(os.path.join(ref, "offsets.npy"), offsets)
    losses = np.load(os.path.join(ref, "turn_loss.npy"))
    losses[:] = np.nan  # a damaged file: named when opened, not deep in a loader worker at its row
    np.save(os.path.join(ref, "turn_loss.npy"), losses)
    with pytest.raises(DataError, match="0 finite reference losses where .* trained turns were scored"):
        Corpus([str(copy)], [key])
    losses = np.load(os.path.join(ref, "turn_loss.npy"))
    finite = np.load(os.path.join(p.folder, f"reference-{key}", "turn_loss.npy"))
    np.save(os.path.join(ref, "turn_loss.npy"), np.roll(finite, 1))  # as many scores, on the wrong turns
    with pytest.raises(DataError, match="has no reference loss for every trained turn"):
        c = Corpus([str(copy)], [key])
        for i in range(50):
            c.row(i)


def test_rows_carry_reference_losses_into_the_batch(corpus):
    root, c, p, key = corpus
    corp = Corpus([p.folder], [key])
    rows = [corp.row(i)[1] for i in range(6)]
    b = collate([[r] for r in rows[:3]] + [rows[3:]], pad_id=0, packed=True)  # 3 rows, then 3 packed in one
    assert b["ref_loss"].shape == b["partial"].shape and b["ref_loss"].dtype == torch.float64
    for d, r in enumerate(rows):
        n = len(r.ref_loss)
        assert np.array_equal(b["ref_loss"][d, :n].numpy(), r.ref_loss.astype(np.float64), equal_nan=True)
        assert torch.isnan(b["ref_loss"][d, n:]).all()
    assert "ref_loss" not in collate([[Corpus([p.folder]).row(0)[1]]], 0, packed=False)


def test_the_method_sees_excess_loss_and_its_histograms_reach_below_zero():
    c = load_config(None, ["stats.signals=[excess]", "resure.threshold=quantile"])
    m = Method(c)
    mean = torch.tensor([[2.0, 3.0], [4.0, float("nan")]], dtype=torch.float64)
    turns = TurnLosses(mean.clone(), torch.tensor([[5, 5], [5, 0]]), mean)
    seen = m.statistic(turns, torch.tensor([[2.5, 1.0], [4.0, float("nan")]], dtype=torch.float64))["excess"]
    assert seen[0].tolist() == [-0.5, 2.0] and seen[1, 0] == 0
    with pytest.raises(ValueError, match="no reference losses"):
        m.statistic(turns, None)
    assert Method(load_config(None, [])).statistic(turns, None)["loss"] is turns.mean
    h = LossHistogram(1, min_loss=-10.0, max_loss=10.0)
    h.counts = h.local_counts(torch.linspace(-3, 3, 6001, dtype=torch.float64))
    assert float(h.median()[0]) == pytest.approx(0.0, abs=0.011)
    assert float(h.quantile(0.9)[0]) == pytest.approx(2.4, abs=0.011)
    assert float(h.scale()[0]) == pytest.approx(1.4826 * 1.5, abs=0.02)
    with pytest.raises(ValueError, match="stats.reference changes the range"):
        LossHistogram(1).load_state_dict(h.state_dict())


# -- real 2-rank runs -------------------------------------------------------------------------
TWO_SIGNALS = ["stats.signals=[loss,excess]", "resure.two_sided=[excess]", "resure.threshold=quantile",
               "resure.weight_fn=hard", "resure.down_share=0.2", "data.mixture=adaptive",
               "data.adaptive.max_step=0.2"]


@pytest.fixture(scope="module")
def ref_runs(tmp_path_factory, tiny_model_path):
    """Two sources, both signals (the excess over base: launch/train.sh scores the corpus first) and the
    adaptive mixture: a straight 6-step run on 2 ranks, and the same command stopped after step 3 and
    resumed on 1 rank with the same global batch."""
    out = tmp_path_factory.mktemp("ref-runs")
    # 150 real dialogues (some 1,400 rows under split at 128 tokens), not all 7,168: the scorer reads
    # every row before the run (100 rows/s here); validation off: held out from 150, it would be one
    chitchat_jsonl(out / "data", per_file=50)
    mix = json.dumps([{"path": str(out / "data" / "part-0.jsonl"), "name": "a b", "weight": 2},
                      {"path": str(out / "data" / "nested"), "name": "b", "weight": 1}])
    args = ["recipes/default.yaml", f"model.path={tiny_model_path}", *COMMON, f"output.dir={out}", *TWO_SIGNALS,
            f"data.train={mix}", "data.eval=null", "eval.every=0"]
    straight = launch("train.sh", [*args, "output.name=straight"])
    launch("train.sh", [*args, "output.name=resumed", "train.stop_after=3"], status=EXIT_RESUME)
    second = launch("train.sh", [*args, "output.name=resumed", "train.micro_batch_size=4"], extra_env={"NUM_PROCS": "1"})
    assert "saved on 2 rank(s), now 1" in second.stderr
    return os.path.join(out, "straight"), os.path.join(out, "resumed"), straight


def _assert_pass(state, values, keys, K):
    """[K, 5] Welford rows equal one float64 pass over (value, bucket key)."""
    n, mean, m2, _ = welford_pass(values, keys, K)
    assert [row[0] for row in state] == n and sum(n) > 20
    for b in range(K):
        if n[b]:
            assert state[b][1] == pytest.approx(mean[b], rel=1e-9, abs=1e-12), b
        if n[b] > 1:
            assert state[b][2] == pytest.approx(m2[b], rel=1e-9, abs=1e-12), b


@pytest.mark.slow
def test_two_ranks_merge_both_signals_and_every_source_exactly(ref_runs):
    """Both signals' per-depth statistics, and their per-(source x depth) ones, end equal to one float64
    pass over the audit's complete turns (loss, and loss - ref_loss); at step 1 (the reference is the
    starting model) every excess is ~0."""
    run, _, launched = ref_runs
    assert "method resure on the loss and the excess loss over base, adaptive mixture" in launched.stderr
    rows = audit(run)
    assert rows and all(r["ref_loss"] is not None for r in rows)
    assert max(abs(r["loss"] - r["ref_loss"]) for r in rows if r["step"] == 1) < 1e-4
    done = [r for r in rows if not r["partial"]]
    last = metrics(run)[-1]
    K = len(last["bucket_n"])
    with open(os.path.join(run, "checkpoints", "latest"), encoding="utf-8") as f:
        tag = f.read().strip()
    with open(os.path.join(run, "checkpoints", tag, "progress.json"), encoding="utf-8") as f:
        state = json.load(f)["method"]["signals"]
    sources = {"a b": 0, "b": 1}
    for sig, value in (("loss", lambda r: r["loss"]), ("excess", lambda r: r["loss"] - r["ref_loss"])):
        vals = [value(r) for r in done]
        _assert_pass(state[sig]["welford"]["state"], vals, [min(r["turn"], K - 1) for r in done], K)
        _assert_pass(state[sig]["by_source"]["state"], vals,
                     [sources[r["source"]] * K + min(r["turn"], K - 1) for r in done], 2 * K)
    n, mean, m2, _ = welford_pass([r["loss"] - r["ref_loss"] for r in done], [r["turn"] for r in done], K)
    assert last["bucket_mean_excess"] == pytest.approx(mean, rel=1e-9, abs=1e-12)
    assert min(last["bucket_mean_excess"][b] for b in range(K) if n[b]) < 0  # excess, not raw loss (about 10.8)
    assert {f"source/{s}/turns" for s in ("a_b", "b")} <= set(last) and "source_share/a_b" in last
    assert sum(last[f"source/{s}/turns"] for s in ("a_b", "b")) == sum(n)


@pytest.mark.slow
def test_the_adaptive_shares_are_the_same_on_every_rank_and_move_with_reliability(ref_runs):
    run, _, _ = ref_runs
    by_step: dict = {}
    for r in audit(run):
        by_step.setdefault((r["step"], r["source"]), set()).add(r["source_weight"])
    assert all(len(v) == 1 for v in by_step.values())  # every rank trained a source's turns with one weight
    m = metrics(run)
    shares = [(r["source_share/a_b"], r["source_share/b"]) for r in m]
    assert shares[0] == pytest.approx((2 / 3, 1 / 3)) and all(sum(s) == pytest.approx(1.0) for s in shares)
    assert len({round(s[0], 12) for s in shares}) > 1  # the reliabilities differ: the shares moved
    for r in m:  # the removed weight beside the budget; both signals' own
        assert {"weight_removed", "weight_removed_loss", "weight_removed_excess", "down_share"} <= set(r)


@pytest.mark.slow
def test_a_stopped_reference_run_resumes_on_one_rank_like_the_straight_run(ref_runs):
    """Stopped after step 3 on 2 ranks, resumed on 1 with the same global batch: the same rows, shares,
    weights and statistics (fp32 rounding of other batch shapes: 1e-5)."""
    straight, resumed, _ = ref_runs
    assert_same_training(straight, resumed, rel=1e-5)
    a, b = metrics(straight), metrics(resumed)
    for ra, rb in zip(a, b):
        for k in ra:
            if k.startswith(("source_share/", "bucket_mean_excess", "weight_removed")) and ra[k] is not None:
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    sw = lambda r: [(x["step"], x["dialogue_id"], x["turn"], x["source_weight"]) for x in audit(r)]  # noqa: E731
    for x, y in zip(sw(straight), sw(resumed)):
        assert x[:3] == y[:3] and x[3] == pytest.approx(y[3], rel=1e-5)


@pytest.mark.slow
def test_two_scoring_tasks_write_what_one_does(corpus, tmp_path):
    """`--tasks-from-env` on 2 processes (as under torchrun): each scores half, task 0 publishes."""
    root, c, p, key = corpus
    shutil.copytree(root / "prep", tmp_path / "prep")
    for f in os.listdir(tmp_path / "prep"):
        shutil.rmtree(tmp_path / "prep" / f / f"reference-{key}", ignore_errors=True)
    args = [sys.executable, "-m", "resure_ds.eval.score", f"model.path={c.model.path}",
            f"data.train={root / 'data'}", f"data.prepared_dir={tmp_path / 'prep'}", *ARGS, "--tasks-from-env"]
    procs = [subprocess.Popen(args, cwd=ROOT, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    outs = [pr.communicate(timeout=600) for pr in procs]
    assert [pr.returncode for pr in procs] == [0, 0], outs
    assert outs[1][0].split()[-1] == key and key not in outs[0][0]  # task 0 publishes and prints the key
    folder = os.path.join(tmp_path / "prep", os.path.basename(p.folder))
    one, two = ReferenceLosses(p.folder, key), ReferenceLosses(folder, key)
    assert np.array_equal(one.offsets, two.offsets)
    np.testing.assert_allclose(two.loss, one.loss, rtol=1e-5)
    assert not os.path.exists(os.path.join(folder, f"reference-{key}.parts"))
    with open(os.path.join(folder, f"reference-{key}", "reference.json"), encoding="utf-8") as f:
        assert json.load(f)["tasks"] == 2


@pytest.mark.slow
def test_two_scorers_of_one_corpus_at_once_publish_one_folder(corpus, tmp_path):
    """Two runs of one study (or two users) scoring the same prepared corpus at the same time: one
    scores, the other waits and reuses its scores (it once failed renaming onto the published folder)."""
    root, c, p, key = corpus
    shutil.copytree(root / "prep", tmp_path / "prep")
    for f in os.listdir(tmp_path / "prep"):
        shutil.rmtree(tmp_path / "prep" / f / f"reference-{key}", ignore_errors=True)
    args = [sys.executable, "-m", "resure_ds.eval.score", f"model.path={c.model.path}",
            f"data.train={root / 'data'}", f"data.prepared_dir={tmp_path / 'prep'}", *ARGS]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [pr.communicate(timeout=600) for pr in procs]
    assert [pr.returncode for pr in procs] == [0, 0], outs
    assert all(o[0].split()[-1] == key for o in outs)
    folder = os.path.join(tmp_path / "prep", os.path.basename(p.folder))
    assert sorted(f for f in os.listdir(folder) if f.startswith("reference-")) == [f"reference-{key}",
                                                                                   f"reference-{key}.lock"]
    np.testing.assert_allclose(ReferenceLosses(folder, key).loss, ReferenceLosses(p.folder, key).loss, rtol=1e-5)
