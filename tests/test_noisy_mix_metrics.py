import itertools

import pytest

from benchmarks.noisy_mix.metrics import auroc, precision_recall, spearman


def brute_auroc(score, label):
    pos = [s for s, y in zip(score, label) if y]
    neg = [s for s, y in zip(score, label) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_definition_with_ties():
    score = [0.1, 0.4, 0.4, 0.8, 0.3, 0.9, 0.4, 0.0]
    label = [0, 1, 0, 1, 0, 1, 1, 0]
    assert auroc(score, label) == pytest.approx(brute_auroc(score, label))
    assert auroc([1, 2, 3], [0, 0, 1]) == 1.0 and auroc([1, 2, 3], [1, 0, 0]) == 0.0
    assert auroc([1, 2], [1, 1]) is None


def test_precision_recall():
    assert precision_recall([1, 1, 0, 0], [1, 0, 1, 0]) == (0.5, 0.5)
    assert precision_recall([0, 0], [1, 0]) == (None, 0.0)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [5, 5, 5]) is None


def test_resume_reads_finished_runs_and_refuses_other_settings(tmp_path):
    from benchmarks.noisy_mix.run import finished_runs

    settings = {"profile": "quick", "data": "chitchat", "settings": {"sizes": [8, 16], "lr": 1e-3}}
    assert finished_runs(str(tmp_path), settings) == {}
    (tmp_path / "runs.jsonl").write_text('{"name": "a", "test": {"loss": 1.5}}\n')
    assert finished_runs(str(tmp_path), settings) == {"a": {"name": "a", "test": {"loss": 1.5}}}
    other = {**settings, "settings": {"sizes": [8, 16], "lr": 5e-5}}
    with pytest.raises(SystemExit, match="other settings.*pass another --out or delete that folder"):
        finished_runs(str(tmp_path), other)
