"""stats.scale=mad: per-bucket loss histograms, their median and MAD, and the robust z (docs/method.md s.3-4)."""
import json

import numpy as np
import pytest
import torch

from resure_ds.config import ConfigError, ResureConfig, load_config
from resure_ds.stats.histogram import MAD_TO_STD, LossHistogram
from resure_ds.stats.weighting import resure_weights, zscores
from resure_ds.stats.welford import Welford


def draws(seed=0, n=3000):
    g = np.random.default_rng(seed)
    loss = np.concatenate([g.lognormal(1.0, 0.4, n), g.normal(6.0, 0.3, n // 10), [25.0, np.nan, np.inf]])
    buckets = g.integers(0, 3, len(loss))  # bucket 3 of 4 stays empty
    return loss, buckets


def test_median_and_mad_match_numpy_to_within_a_bin():
    loss, buckets = draws()
    h = LossHistogram(4)
    h.sync_update(torch.tensor(loss), torch.tensor(buckets))
    med, mad = h.median(), h.mad()
    for b in range(3):
        v = loss[(buckets == b) & np.isfinite(loss)]
        assert med[b].item() == pytest.approx(np.median(v), abs=h.width)
        assert mad[b].item() == pytest.approx(np.median(np.abs(v - np.median(v))), abs=h.width)
    assert h.counts[:3].sum().item() == np.isfinite(loss).sum()  # 25 nats counts in the last bin; NaN/inf do not
    assert torch.isnan(med[3]) and torch.isnan(mad[3])
    assert h.scale()[0].item() == pytest.approx(MAD_TO_STD * mad[0].item())


def test_updates_add_and_decay_scales_the_past():
    h, once = LossHistogram(2, decay=0.5), LossHistogram(2)
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0])
    h.sync_update(a, torch.tensor([0, 0, 1]))
    h.sync_update(b, torch.tensor([1]))
    once.sync_update(a, torch.tensor([0, 0, 1]))
    assert torch.equal(h.counts, 0.5 * once.counts + once.local_counts(b, torch.tensor([1])))


def test_state_survives_json_and_refuses_another_shape():
    loss, buckets = draws(1)
    h = LossHistogram(4)
    h.sync_update(torch.tensor(loss), torch.tensor(buckets))
    sd = json.loads(json.dumps(h.state_dict()))
    assert len(sd["cells"]) < 4 * h.bins // 2  # only the non-empty cells
    back = LossHistogram(4)
    back.load_state_dict(sd)
    assert torch.equal(back.counts, h.counts)
    with pytest.raises(ValueError, match="buckets"):
        LossHistogram(8).load_state_dict(sd)


def test_robust_z_sees_outliers_the_inflated_std_hides():
    """A bucket where 15% of the turns are outliers spread over 4-12 nats (as corrupted replies'
    losses are): they inflate the std so much that an outlier's own z stays under tau, while the
    median and MAD stay near the genuine turns' (3.0 and 0.3) and flag it."""
    g = np.random.default_rng(2)
    genuine, outliers = g.normal(3.0, 0.3, 850), g.uniform(4.0, 12.0, 150)
    vals = torch.tensor(np.concatenate([genuine, outliers]))
    paper, robust = Welford(1), Welford(1, scale="mad")
    for w in (paper, robust):
        w.sync_update(vals, torch.zeros(len(vals), dtype=torch.long))
    assert robust.center[0].item() == pytest.approx(3.0, abs=0.1) and paper.center[0].item() > 3.5
    assert robust.spread[0].item() < 0.45 and paper.spread[0].item() > 1.5
    probe = torch.tensor([[5.0]], dtype=torch.float64)
    z_paper, z_robust = zscores(probe, paper, 1e-6)[0, 0].item(), zscores(probe, robust, 1e-6)[0, 0].item()
    assert z_paper < 1.5 < 5.0 < z_robust
    cfg = ResureConfig(min_count=16)
    present = torch.ones_like(probe, dtype=torch.bool)
    assert resure_weights(probe, present, paper, cfg, 10).w.item() > 0.9
    assert resure_weights(probe, present, robust, cfg, 10).w.item() < 0.05
    assert robust.state_dict()["robust"] is not None and paper.state_dict()["robust"] is None


def test_spread_is_nan_until_two_turns_and_settings_must_match_to_resume():
    w = Welford(2, scale="mad")
    w.sync_update(torch.tensor([2.0]), torch.tensor([0]))
    assert torch.isnan(w.spread).all()  # n < 2: z undefined, as with the std
    w.sync_update(torch.tensor([3.0, 2.5]), torch.tensor([0, 0]))
    assert w.spread[0].item() > 0 and torch.isnan(w.spread[1])
    with pytest.raises(ValueError, match="stats.scale=mad"):
        Welford(2).load_state_dict(w.state_dict())
    again = Welford(2, scale="mad")
    again.load_state_dict(json.loads(json.dumps({**w.state_dict(), "state": w.state.tolist()})) | {"state": w.state})
    assert torch.equal(again.robust.counts, w.robust.counts)
    torch.testing.assert_close(again.spread, w.spread, rtol=0, atol=0, equal_nan=True)


def test_mad_with_length_scaled_is_refused():
    with pytest.raises(ValueError, match="length_scaled"):
        Welford(2, length_scaled=True, scale="mad")
    with pytest.raises(ConfigError, match="stats.scale=mad with stats.length_scaled"):
        load_config(None, ["stats.scale=mad", "stats.length_scaled=true"])
    assert load_config(None, ["stats.scale=mad"]).stats.scale == "mad"
