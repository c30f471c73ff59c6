"""The study's quick profile end to end: checks the pipeline and the results schema, not the outcome."""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # the study's pipeline: dozens of small runs


def study(out_dir, port: int, *sets: str) -> subprocess.CompletedProcess:
    """The quick profile into out_dir, with --set overrides."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "noisy_mix", "run.py"),
                           "--profile", "quick", "--out", str(out_dir), *(f"--set={s}" for s in sets)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "MASTER_PORT": str(port)})


def test_quick_profile_pipeline_and_schema(tmp_path, smollm2_path):
    out = study(tmp_path, 29611)
    assert out.returncode == 0, out.stderr[-4000:]
    with open(tmp_path / "results.json", encoding="utf-8") as f:
        res = json.load(f)
    methods = {"sft", "resure", "loss_truncation", "prefilter", "prefilter_epochs"}
    assert {r["method"] for r in res["runs"]} == methods
    assert {r["noise"] for r in res["runs"]} == {0.0, 0.3}
    for r in res["runs"]:
        assert r["test"]["loss"] > 0 and r["test"]["per_depth"]
        assert set(r["detection"]) >= {"auroc_1_minus_w", "auroc_z", "precision_w_lt_0.5", "recall_w_lt_0.5",
                                       "per_kind"}
    big = [r for r in res["runs"] if r["noise"] == 0.3 and r["method"] == "resure" and r["size"] == 32]
    assert big and all(r["detection"]["corrupted"] > 0 for r in big)  # labelled turns seen after warm-up
    assert set(big[0]["detection"]["per_kind"]) == {"swap", "shuffle", "random", "echo", "truncate"}
    assert 0.0 <= big[0]["detection"]["auroc_1_minus_w"] <= 1.0
    lt = [r for r in res["runs"] if r["noise"] == 0.3 and r["method"] == "loss_truncation" and r["size"] == 32]
    assert lt and all(r["detection"]["turns"] > 0 and r["detection"]["auroc_z"] is None for r in lt)
    for noise in (0.0, 0.3):  # one global cut: filtered sets shrink and stay nested
        pre = sorted(((r["size"], r["train_dialogues"]) for r in res["runs"]
                      if r["method"] == "prefilter" and r["noise"] == noise and r["seed"] == 0),
                     key=lambda x: x[0])
        assert all(kept <= size for size, kept in pre) and pre[-1][1] < pre[-1][0]
        assert [k for _, k in pre] == sorted(k for _, k in pre)
        cut = {(r["size"], r["seed"]): r for r in res["runs"] if r["method"] == "prefilter" and r["noise"] == noise}
        mb, epochs = res["settings"]["micro_batch_size"], res["settings"]["epochs"]
        for r in res["runs"]:  # the same kept dialogues; epochs over them, not over the unfiltered size
            if r["method"] == "prefilter_epochs" and r["noise"] == noise:
                twin = cut[r["size"], r["seed"]]
                assert r["train_dialogues"] == twin["train_dialogues"]
                assert r["steps"] == math.ceil(r["train_dialogues"] / mb) * epochs
                assert twin["steps"] == math.ceil(r["size"] / mb) * epochs
    corr = res["summary"]["spearman_size_vs_neg_test_loss"]
    assert set(corr) == {f"{m}@{n}" for m in methods for n in (0.0, 0.3)}
    cells = res["summary"]["largest_size"]
    # the seed variant (stats.scale=mad) beside the methods, at the main noise, with every seed
    assert set(cells) == set(corr) | {"resure-scalemad@0.3"}
    assert all(c["over_seeds"]["test_loss"]["n"] == 2 for c in cells.values())
    with open(tmp_path / "runs" / "n0.3-resure-scalemad-s32-seed1" / "config.json", encoding="utf-8") as f:
        assert json.load(f)["stats"]["scale"] == "mad"
    for c in cells.values():  # each seed against sft with the same seed
        assert set(c["minus_sft_paired"]) == set(c["over_seeds"]) >= {"test_loss", "later_clean", "later_delta",
                                                                      "margin_random", "margin_echo"}
    assert all(cells[f"sft@{n}"]["minus_sft_paired"]["test_loss"]["mean"] == 0.0 for n in (0.0, 0.3))
    by = {(r["method"], r["seed"]): r for r in res["runs"] if r["noise"] == 0.3 and r["size"] == 32
          and not r["variant"]}
    diffs = [by["resure", s]["test"]["loss"] - by["sft", s]["test"]["loss"] for s in (0, 1)]
    assert abs(cells["resure@0.3"]["minus_sft_paired"]["test_loss"]["mean"] - sum(diffs) / 2) < 1e-12
    margins = [by["resure", s]["probe"]["uptake_margin"]["random"] - by["sft", s]["probe"]["uptake_margin"]["random"]
               for s in (0, 1)]
    assert abs(cells["resure@0.3"]["minus_sft_paired"]["margin_random"]["mean"] - sum(margins) / 2) < 1e-12
    for r in res["runs"]:  # the probe runs at the largest size only
        assert (r["probe"] is not None) == (r["size"] == 32)
    pr = by["sft", 0]["probe"]
    assert 0 < pr["dialogues"] <= 8 and pr["later_turns"] > 0 and set(pr["uptake_margin"]) == set(pr["later_delta"])
    assert all(0 <= v <= pr["later_turns"] for v in pr["later_pairs"].values())  # later turns kept whole or cut alike
    prevented = res["summary"]["uptake_prevented"]
    assert set(prevented["sft@0.3"]) <= {"swap", "shuffle", "random", "echo", "truncate"}
    assert all(abs(v) < 1e-12 for v in prevented["sft@0.3"].values() if v is not None)  # sft prevents none of its own
    assert res["base"]["probe"]["dialogues"] == pr["dialogues"]  # the same probe set for every model
    assert "resure-two_sidedTrue" in res["summary"]["sweep"]
    for png in ("test_loss_vs_size.png", "detection_auroc.png", "uptake_margin.png"):
        assert os.path.getsize(tmp_path / png) > 5000
    assert "| method @ noise |" in (tmp_path / "results.md").read_text()
    # the same command again resumes: every run is read back from runs.jsonl, none is trained again
    again = study(tmp_path, 29612)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "test loss" not in again.stdout and f"{len(res['runs'])} runs in" in again.stdout
    with open(tmp_path / "results.json", encoding="utf-8") as f:
        assert json.load(f)["runs"] == res["runs"]
    # a shorter sweep or list of seed variants only leaves runs out; another setting is refused
    fewer = study(tmp_path, 29613, "sweep=[]", "seed_variants=[]")
    assert fewer.returncode == 0 and "test loss" not in fewer.stdout, fewer.stderr[-4000:]
    other = study(tmp_path, 29613, "lr=0.5")
    assert other.returncode != 0 and "holds runs made with other settings" in other.stderr


def test_round4_quick_profile_pipeline_and_schema(tmp_path, smollm2_path):
    """Round 4 (benchmarks/noisy_mix/round4.py) end to end on the tiny model: every arm on every seed,
    paired intervals against sft, the oracle's gap, generation measures, detection per score."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "noisy_mix", "round4.py"), "--profile",
                          "quick", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "MASTER_PORT": "29655"})
    assert out.returncode == 0, out.stderr[-4000:]
    with open(tmp_path / "results.json", encoding="utf-8") as f:
        res = json.load(f)
    arms = {"sft", "resure", "resure_mad", "resure_quantile", "loss_truncation", "prefilter", "oracle", "clean",
            "resure_excess", "resure_excess_quantile", "dft"}
    main = [r for r in res["runs"] if r["noise"] == 0.3]
    assert {r["arm"] for r in main} == arms and len(main) == 2 * len(arms)
    clean = res["summary"]["0.0"]["arms"]  # 0% noise: fewer arms and seeds; nothing corrupted to weigh
    assert set(clean) == {"sft", "resure_excess_quantile"} and clean["sft"]["n"] == 1
    assert clean["resure_excess_quantile"]["weights"]["mean_w_corrupted"] is None
    cell = res["summary"]["0.3"]
    assert set(cell["arms"]) == arms
    gap = cell["arms"]["oracle"]["oracle_gap_recovered"]  # 1 where the oracle's gain is resolved, else None
    assert gap and all(v in (None, 1.0) for v in gap.values())
    for arm, c in cell["arms"].items():
        d = c["minus_sft"]["test_loss"]
        assert d["n"] == 2 and d["lo"] <= d["mean"] <= d["hi"], arm
    assert set(cell["detection"]) == {"raw loss", "z (std)", "z (mad)", "base-model loss", "excess loss",
                                      "z of the excess loss (in training)"}
    excess = [r for r in res["runs"] if r["arm"] == "resure_excess"]
    assert all(r["weights"]["mean_w_corrupted"] is not None for r in excess)
    assert all(len(c) == 8 for c in cell["contamination_per_bucket"])
    oracle = [r for r in res["runs"] if r["arm"] == "oracle"]
    sft = {r["seed"]: r for r in res["runs"] if r["arm"] == "sft"}
    assert all(r["train_dialogues"] < sft[r["seed"]]["train_dialogues"] for r in oracle)  # it dropped the noise
    assert (tmp_path / "results.md").exists()
    assert os.path.getsize(tmp_path / "round4-noise0.30.png") > 10000 and (tmp_path / "round4-noise0.00.png").exists()
