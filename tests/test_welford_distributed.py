"""Distributed Welford invariance on real gloo process groups (docs/method.md s.3)."""
import random

import pytest
import torch

from resure_ds.config import ResureConfig
from resure_ds.stats.weighting import resure_weights
from resure_ds.stats.welford import Welford
from tests.dist import run_ranks
from tests.welford_ref import assert_matches

K = 8


def global_steps(seed, n_steps=25):
    """Each step: a global multiset of (turn loss, turn depth), including NaN/inf."""
    rng = random.Random(seed)
    out = []
    for s in range(n_steps):
        m = rng.randint(0, 30)
        vals = [rng.lognormvariate(1.2 - 0.01 * s, 0.5) for _ in range(m)]
        turns = [rng.choice([0, 0, 0, 1, 1, 2, 5, 7, 11]) for _ in range(m)]
        for _ in range(rng.randint(0, 2)):
            if m:
                vals[rng.randrange(m)] = rng.choice([float("nan"), float("inf"), -float("inf")])
        out.append((vals, turns))
    return out


def count(v):
    """A turn's token count, a function of its loss so every rank and the reference agree."""
    return 1 + int(abs(v) * 37) % 250 if v == v and abs(v) != float("inf") else 1


def partition(vals, turns, world, rng):
    """Uneven split; rank 0 never gets bucket >= 2, the last rank sometimes gets nothing."""
    parts = [([], []) for _ in range(world)]
    for v, t in zip(vals, turns):
        r = rng.randrange(world)
        if r == 0 and t >= 2 and world > 1:
            r = 1
        if world > 2 and r == world - 1 and rng.random() < 0.5:
            r = 0 if t < 2 else 1
        parts[r][0].append(v)
        parts[r][1].append(t)
    return parts


def worker(rank, world, seed, grad_accum, length_scaled=False, scale="std"):
    steps = global_steps(seed)
    rng = random.Random(seed + 100)
    w = Welford(K, length_scaled=length_scaled, scale=scale)
    probe = torch.tensor([[3.0, 3.5, 9.0, 1.0], [2.0, 8.0, 2.5, 3.3]], dtype=torch.float64)
    for vals, turns in steps:
        part_v, part_t = partition(vals, turns, world, rng)[rank]
        # a gradient-accumulation split of this rank's share into micro-steps (some may be empty)
        cuts = sorted(random.Random(len(part_v) + rank).choices(range(len(part_v) + 1), k=grad_accum - 1))
        bounds = [0] + cuts + [len(part_v)]
        for a, b in zip(bounds, bounds[1:]):
            w.sync_update(torch.tensor(part_v[a:b], dtype=torch.float64), torch.tensor(part_t[a:b], dtype=torch.long),
                          counts=torch.tensor([count(v) for v in part_v[a:b]]))
    weights = resure_weights(probe, torch.ones_like(probe, dtype=torch.bool), w,
                             ResureConfig(weight_fn="sigmoid", tau=1.0, min_count=5), step=100,
                             count=torch.tensor([[40, 3, 250, 9], [1, 120, 7, 60]]))
    return {"state": w.state, "w": weights.w, "z": weights.z, "robust": None if w.robust is None else w.robust.counts}


@pytest.mark.parametrize("world,grad_accum", [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_distributed_stats_equal_single_pass(tmp_path, world, grad_accum):
    seed = 11
    results = run_ranks(worker, world, (seed, grad_accum), str(tmp_path))
    allv = [v for vals, _ in global_steps(seed) for v in vals]
    allt = [t for _, turns in global_steps(seed) for t in turns]
    for r in results:
        assert_matches(r["state"], allv, allt, K)
    # statistics and weights bit-identical on every rank
    for r in results[1:]:
        assert torch.equal(r["state"], results[0]["state"])
        assert torch.equal(r["w"], results[0]["w"])
        torch.testing.assert_close(r["z"], results[0]["z"], rtol=0, atol=0, equal_nan=True)
    assert results[0]["state"][:, 3].sum() > 0  # non-finite losses were seen and counted
    assert (results[0]["w"] < 1).any() and (results[0]["w"] == 1).any()  # the probe is non-trivial


@pytest.mark.parametrize("world,grad_accum", [(3, 2)])
def test_length_scaled_stats_equal_a_weighted_single_pass(tmp_path, world, grad_accum):
    from tests.welford_ref import assert_matches_weighted

    seed = 12
    results = run_ranks(worker, world, (seed, grad_accum, True), str(tmp_path))
    allv = [v for vals, _ in global_steps(seed) for v in vals]
    allt = [t for _, turns in global_steps(seed) for t in turns]
    for r in results:
        assert_matches_weighted(r["state"], allv, allt, [count(v) for v in allv], K)
        assert torch.equal(r["state"], results[0]["state"]) and torch.equal(r["w"], results[0]["w"])


def test_robust_histograms_equal_a_single_pass_on_every_rank(tmp_path):
    """stats.scale=mad: the per-bucket loss histograms, summed over 3 ranks with accumulation, equal
    one process's over all the turns (counts add exactly); z and weights identical on every rank."""
    from resure_ds.stats.histogram import LossHistogram

    seed = 13
    results = run_ranks(worker, 3, (seed, 2, False, "mad"), str(tmp_path))
    allv = [v for vals, _ in global_steps(seed) for v in vals]
    allt = [min(t, K - 1) for _, turns in global_steps(seed) for t in turns]
    ref = LossHistogram(K)
    ref.sync_update(torch.tensor(allv, dtype=torch.float64), torch.tensor(allt))
    for r in results:
        assert torch.equal(r["robust"], ref.counts)
        assert torch.equal(r["w"], results[0]["w"])
        torch.testing.assert_close(r["z"], results[0]["z"], rtol=0, atol=0, equal_nan=True)
    assert (results[0]["w"] < 1).any() and (results[0]["w"] == 1).any()  # the probe is non-trivial
