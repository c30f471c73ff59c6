import random

import pytest
import torch

from resure_ds.stats.welford import Welford, merge, summarize
from tests.welford_ref import assert_matches


def steps(seed, n_steps=30, K=8):
    rng = random.Random(seed)
    out = []
    for _ in range(n_steps):
        m = rng.randint(0, 25)
        vals = [rng.lognormvariate(1.0, 0.6) for _ in range(m)]
        turns = [rng.choice([0, 0, 1, 2, 3, 9, 12]) for _ in range(m)]
        if m and rng.random() < 0.3:
            vals[rng.randrange(m)] = rng.choice([float("nan"), float("inf")])
        out.append((vals, turns))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stepwise_updates_equal_single_pass(seed):
    K = 8
    w = Welford(K)
    allv, allt = [], []
    for vals, turns in steps(seed, K=K):
        w.sync_update(torch.tensor(vals, dtype=torch.float64), torch.tensor(turns, dtype=torch.long))
        allv += vals
        allt += turns
    assert_matches(w.state, allv, allt, K)
    assert w.nonfinite.sum() > 0


def test_merge_is_exact_for_any_split():
    rng = random.Random(3)
    vals = [rng.gauss(3, 2) for _ in range(200)]
    turns = [rng.randrange(5) for _ in range(200)]
    whole = summarize(torch.tensor(vals), torch.tensor(turns), 5)
    for cut in (0, 1, 77, 200):
        a = summarize(torch.tensor(vals[:cut]), torch.tensor(turns[:cut], dtype=torch.long), 5)
        b = summarize(torch.tensor(vals[cut:]), torch.tensor(turns[cut:], dtype=torch.long), 5)
        m = merge(a, b)
        assert torch.allclose(m, whole, rtol=1e-12, atol=1e-12)


def test_decay_equals_exponentially_weighted_statistics():
    rng = random.Random(4)
    decay, w = 0.9, Welford(1, decay=0.9)
    hist = []
    for s in range(20):
        vals = [rng.gauss(5 - 0.1 * s, 1) for _ in range(rng.randint(1, 6))]
        w.sync_update(torch.tensor(vals, dtype=torch.float64), torch.zeros(len(vals), dtype=torch.long))
        hist.append(vals)
    S = len(hist)
    weights = [(decay ** (S - 1 - s), x) for s, vals in enumerate(hist) for x in vals]
    n = sum(a for a, _ in weights)
    mean = sum(a * x for a, x in weights) / n
    m2 = sum(a * (x - mean) ** 2 for a, x in weights)
    assert abs(w.n[0].item() - n) < 1e-9 * n
    assert abs(w.mean[0].item() - mean) < 1e-9 * abs(mean)
    assert abs(w.state[0, 2].item() - m2) < 1e-9 * m2


def test_state_dict_roundtrip_and_bucket_mismatch():
    w = Welford(4)
    w.sync_update(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0, 1, 7]))
    w2 = Welford(4)
    w2.load_state_dict(w.state_dict())
    assert torch.equal(w.state, w2.state)
    with pytest.raises(ValueError, match="stats.num_buckets=4"):
        Welford(8).load_state_dict(w.state_dict())
    assert w.std[0].isnan()  # n = 1: undefined


def test_length_scaled_statistics_equal_a_weighted_single_pass():
    """stats.length_scaled: every turn weighted by its token count; the stepwise, merged state equals
    a one-at-a-time weighted Welford pass, and W = n exactly without weights."""
    from tests.welford_ref import assert_matches_weighted

    K, rng = 8, random.Random(5)
    w, plain = Welford(K, length_scaled=True), Welford(K)
    allv, allt, allc = [], [], []
    for vals, turns in steps(5, K=K):
        counts = [rng.randint(1, 300) for _ in vals]
        w.sync_update(torch.tensor(vals, dtype=torch.float64), torch.tensor(turns, dtype=torch.long),
                      counts=torch.tensor(counts))
        plain.sync_update(torch.tensor(vals, dtype=torch.float64), torch.tensor(turns, dtype=torch.long),
                          counts=torch.tensor(counts))  # ignored: unit weights
        allv, allt, allc = allv + vals, allt + turns, allc + counts
    assert_matches_weighted(w.state, allv, allt, allc, K)
    assert_matches(plain.state, allv, allt, K)
    assert torch.equal(plain.state[:, 4], plain.state[:, 0])


def test_length_scaled_std_estimates_the_per_token_spread():
    """Turn losses drawn with Var(L | c) = sigma^2 / c: the weighted statistics recover sigma and
    the mean, where the plain ones mix every length into one spread."""
    g = torch.Generator().manual_seed(0)
    c = torch.randint(1, 200, (20000,), generator=g)
    loss = 2.0 + 1.5 * torch.randn(20000, generator=g, dtype=torch.float64) / c.double().sqrt()
    w = Welford(1, length_scaled=True)
    w.sync_update(loss, torch.zeros_like(c), counts=c)
    assert abs(w.mean[0].item() - 2.0) < 0.01 and abs(w.std[0].item() - 1.5) < 0.03


def test_length_scaled_state_loads_only_into_the_same_setting():
    w = Welford(4, length_scaled=True)
    w.sync_update(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), counts=torch.tensor([3, 5]))
    with pytest.raises(ValueError, match="length_scaled"):
        Welford(4).load_state_dict(w.state_dict())
    again = Welford(4, length_scaled=True)
    again.load_state_dict(w.state_dict())
    assert torch.equal(again.state, w.state)