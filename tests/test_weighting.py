import math

import pytest
import torch

from resure_ds.config import LossTruncationConfig, ResureConfig
from resure_ds.stats.histogram import LossHistogram
from resure_ds.stats.weighting import resure_weights, sft_weights, truncation_weights
from resure_ds.stats.welford import Welford


def stats_with(mean=2.0, std=0.5, n=1000, K=4):
    """Welford state with an exact mean/std per bucket."""
    w = Welford(K)
    w.state[:, 0] = n
    w.state[:, 1] = mean
    w.state[:, 2] = std ** 2 * (n - 1)
    return w


def cfg(**kw):
    base = dict(weight_fn="hard", tau=1.0, min_count=10, eps=0.0)
    base.update(kw)
    return ResureConfig(**base)


def L(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_z_and_each_weight_fn():
    st = stats_with()
    loss = L([2.0, 2.5, 3.0, 4.0])  # z = 0, 1, 2, 4
    present = torch.ones_like(loss, dtype=torch.bool)
    hard = resure_weights(loss, present, st, cfg(), 0)
    assert hard.z.tolist() == [[0.0, 1.0, 2.0, 4.0]]
    assert hard.w.tolist() == [[1, 1, 0, 0]]
    e = resure_weights(loss, present, st, cfg(weight_fn="exp", lam=0.5), 0).w
    assert torch.allclose(e, torch.tensor([[1, 1, math.exp(-0.5), math.exp(-1.5)]], dtype=torch.float32))
    s = resure_weights(loss, present, st, cfg(weight_fn="sigmoid", s=0.5), 0).w
    assert torch.allclose(s, torch.tensor([[1 / (1 + math.exp(-2)), 0.5, 1 / (1 + math.exp(2)),
                                            1 / (1 + math.exp(6))]], dtype=torch.float32))


def test_two_sided_flags_abnormally_low_loss():
    st = stats_with()
    loss = L([0.5, 2.0])  # z = -3, 0
    present = torch.ones_like(loss, dtype=torch.bool)
    assert resure_weights(loss, present, st, cfg(), 0).w.tolist() == [[1, 1]]
    assert resure_weights(loss, present, st, cfg(two_sided=True), 0).w.tolist() == [[0, 1]]


def test_warmup_by_count_and_by_step():
    loss = L([9.0, 9.0])
    present = torch.ones_like(loss, dtype=torch.bool)
    cold = resure_weights(loss, present, stats_with(n=5), cfg(), 0)
    assert cold.w.tolist() == [[1, 1]] and not cold.warm.any()
    assert resure_weights(loss, present, stats_with(), cfg(), 0).warm.all()
    assert resure_weights(loss, present, stats_with(), cfg(warmup_steps=3), 2).w.tolist() == [[1, 1]]
    assert resure_weights(loss, present, stats_with(), cfg(warmup_steps=3), 3).w.tolist() == [[0, 0]]


def test_propagate_level_floor_and_absent_turns():
    st = stats_with()
    nan = float("nan")
    loss = L([2.0, 4.0, 2.0, nan], [2.0, 2.0, 2.0, 2.0])
    present = ~torch.isnan(loss)
    assert resure_weights(loss, present, st, cfg(), 0).w.tolist() == [[1, 0, 1, 1], [1, 1, 1, 1]]
    fwd = resure_weights(loss, present, st, cfg(propagate="forward"), 0).w
    assert fwd.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]
    smp = resure_weights(loss, present, st, cfg(level="sample"), 0).w
    assert smp.tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]
    fl = resure_weights(loss, present, st, cfg(floor=0.25), 0).w
    assert fl.tolist() == [[1, 0.25, 1, 1], [1, 1, 1, 1]]


def test_nonfinite_turn_gets_zero_weight():
    loss = L([float("inf"), 2.0])
    present = torch.ones_like(loss, dtype=torch.bool)
    assert resure_weights(loss, present, stats_with(), cfg(), 0).w.tolist() == [[0, 1]]
    assert sft_weights(loss, present, stats_with(), 1e-6).w.tolist() == [[0, 1]]


def test_loss_truncation_drops_above_quantile():
    h = LossHistogram(1, bins=1000, max_loss=10.0)
    h.sync_update(torch.arange(1, 101, dtype=torch.float64) / 10)  # 0.1 .. 10.0
    assert h.upper_quantile(0.9) == pytest.approx(9.0, abs=0.02)
    loss = L([1.0, 8.9, 9.5])
    present = torch.ones_like(loss, dtype=torch.bool)
    w = truncation_weights(loss, present, h, LossTruncationConfig(drop_fraction=0.1, min_count=10)).w
    assert w.tolist() == [[1, 1, 0]]
    warm = truncation_weights(loss, present, h, LossTruncationConfig(drop_fraction=0.1, min_count=1000))
    assert warm.w.tolist() == [[1, 1, 1]] and not warm.warm.any()


def test_sft_weights_are_ones_with_z_logged():
    st = stats_with()
    loss = L([2.0, 9.0])
    out = sft_weights(loss, torch.ones_like(loss, dtype=torch.bool), st, 0.0)
    assert out.w.tolist() == [[1, 1]] and out.z[0, 1].item() == 14.0


def test_length_scaled_z_compares_a_turn_with_the_spread_of_its_length():
    """The same mean-loss excess is unremarkable in a 2-token reply and an outlier in a 200-token one."""
    st = stats_with(mean=2.0, std=4.0)  # per-token spread
    st.length_scaled = True
    loss, present, count = L([3.0, 3.0]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([[2, 200]])
    r = resure_weights(loss, present, st, cfg(tau=1.5), 0, count)
    assert r.z[0, 0].item() == pytest.approx(1.0 / (4.0 / math.sqrt(2)))
    assert r.z[0, 1].item() == pytest.approx(1.0 / (4.0 / math.sqrt(200)))
    assert r.w.tolist() == [[1.0, 0.0]]
    st.length_scaled = False  # the paper's z: both turns alike
    assert resure_weights(loss, present, st, cfg(tau=1.5), 0, count).z[0].tolist() == [0.25, 0.25]


def test_a_fixed_tau_cannot_flag_a_large_cluster_and_the_quantile_threshold_can():
    """docs/method.md s.4: a cluster that is a share p of its bucket reaches at most z = sqrt((1-p)/p).
    40% of a bucket at loss 8 among 60% at 2: the cluster's z is sqrt(0.6/0.4) = 1.22 < tau = 1.5, so the
    paper's rule gives it weight 1 however far off it is. resure.threshold=quantile with down_share=0.4
    puts the threshold at the bucket's 60% loss quantile: the cluster, and only it, is down-weighted."""
    losses = torch.tensor([2.0] * 60 + [8.0] * 40, dtype=torch.float64)
    for threshold, want_down in (("z", 0), ("quantile", 40)):
        c = ResureConfig(weight_fn="hard", min_count=2, threshold=threshold, down_share=0.4)
        st = Welford(1, histograms=threshold == "quantile")
        st.sync_update(losses, torch.zeros(100, dtype=torch.long))
        z = (8.0 - st.mean[0].item()) / st.std[0].item()
        assert abs(z - math.sqrt(0.6 / 0.4) * math.sqrt(99 / 100)) < 1e-9  # the ceiling (sample std)
        loss = losses[None, :]
        w = resure_weights(loss, torch.ones_like(loss, dtype=torch.bool), st, c, 0).w[0]
        assert int((w < 1).sum()) == want_down and bool((w[60:] < 1).all()) == (want_down == 40)
