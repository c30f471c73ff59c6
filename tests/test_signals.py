"""Two signals at once, source reliability, the adaptive mixture and the rule that spends its budget
(docs/method.md s.9-s.10), on the method's own parts; the real 2-rank runs are in test_reference.py."""
import json
import math

import pytest
import torch

from resure_ds.config import AdaptiveConfig, ConfigError, ResureConfig, load_config
from resure_ds.stats.method import Method
from resure_ds.stats.sources import Mixture, SourceReliability, metric_names
from resure_ds.stats.turns import TurnLosses
from resure_ds.stats.weighting import signal_weights
from resure_ds.stats.welford import Welford


def warmed(values: torch.Tensor, K: int = 1) -> Welford:
    """Per-depth statistics (with histograms, as the quantile threshold keeps them) of `values`."""
    w = Welford(K, histograms=True, min_loss=-10.0)
    w.sync_update(values, torch.zeros(len(values), dtype=torch.long))
    return w


def rule(**kw):
    base = dict(threshold="quantile", down_share=0.2, weight_fn="hard", min_count=10, eps=1e-12)
    base.update(kw)
    return ResureConfig(**base)


def removed(cfg, two_sided=False, n=20000):
    """The share of weight a rule removes from fresh draws of the distribution its statistics saw."""
    g = torch.Generator().manual_seed(0)
    st = warmed(torch.randn(n, generator=g, dtype=torch.float64))
    x = torch.randn(1, n, generator=g, dtype=torch.float64)
    w, _, _ = signal_weights(x, torch.ones_like(x, dtype=torch.bool), st, cfg, 0, None, two_sided)
    return float(1 - w.mean())


def test_only_a_hard_or_steep_rule_spends_the_quantile_budget():
    """The quantile threshold puts down_share of a bucket past it; what leaves is the weight_fn's
    business: hard removes the budget, a steep sigmoid most of it, exp (lam 1) a fraction."""
    assert removed(rule()) == pytest.approx(0.2, abs=0.015)
    assert removed(rule(), two_sided=True) == pytest.approx(0.2, abs=0.015)  # 0.1 in each tail
    assert removed(rule(weight_fn="sigmoid", s=0.05)) == pytest.approx(0.2, abs=0.03)
    assert removed(rule(weight_fn="exp", lam=1.0)) < 0.08  # what the study saw: far under the budget


def test_two_sided_quantile_catches_the_low_tail_only_when_asked():
    st = warmed(torch.randn(5000, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    x = torch.tensor([[-3.0, 0.0, 3.0]], dtype=torch.float64)
    present = torch.ones_like(x, dtype=torch.bool)
    one, _, _ = signal_weights(x, present, st, rule(), 0, None, False)
    two, _, _ = signal_weights(x, present, st, rule(), 0, None, True)
    assert one.tolist() == [[1.0, 1.0, 0.0]] and two.tolist() == [[0.0, 1.0, 0.0]]


def test_two_signals_give_the_smaller_weight_and_its_z():
    c = load_config(None, ["stats.signals=[loss,excess]", "resure.threshold=z", "resure.weight_fn=hard",
                           "resure.tau=1.0", "resure.min_count=2", "resure.two_sided=[excess]", "stats.num_buckets=1",
                           "resure.eps=1e-12"])
    m = Method(c)
    for s in m.signals:  # each signal's statistics: mean 0, std 1
        s.stats.state[0, :3] = torch.tensor([100.0, 0.0, 99.0], dtype=torch.float64)
        s.stats.state[0, 4] = 100.0
    loss = torch.tensor([[0.0, 2.0, 0.5]], dtype=torch.float64)
    ref = torch.tensor([[3.0, 2.0, 0.0]], dtype=torch.float64)  # excess: -3 (low: two-sided), 0, 0.5
    turns = TurnLosses(loss.clone(), torch.tensor([[4, 4, 4]]), loss)
    seen = m.statistic(turns, ref)
    w = m.weigh(seen, 10, turns.count)
    assert w.w.tolist() == [[0.0, 0.0, 1.0]]  # excess's low tail; the loss's high tail; neither
    assert w.z[0].tolist() == pytest.approx([-3.0, 2.0, 0.5]) and w.zs["loss"][0].tolist() == pytest.approx([0, 2, 0.5])
    assert w.ws["excess"].tolist() == [[0.0, 1.0, 1.0]]


def test_reliability_sums_over_ranks_and_decays():
    r = SourceReliability(3, decay=0.5)
    r.sync_update(torch.tensor([1.0, 0.0, 0.5, 1.0]), torch.tensor([0, 0, 1, 1]))
    assert r.turns.tolist() == [2.0, 2.0, 0.0] and r.reliability()[:2].tolist() == [0.5, 0.75]
    assert math.isnan(r.reliability()[2]) and r.pooled() == pytest.approx(2.5 / 4)
    r.sync_update(torch.tensor([1.0]), torch.tensor([2]))
    assert r.turns.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="covers 3 sources, this run has 2"):
        SourceReliability(2).load_state_dict(r.state_dict())


def test_the_mixture_moves_a_capped_step_towards_reliable_sources_and_keeps_its_floor():
    cfg = AdaptiveConfig(strength=10.0, floor=0.1, max_step=0.05, prior=0.0)
    m = Mixture([3.0, 1.0], cfg)
    rel = SourceReliability(2)
    rel.sync_update(torch.tensor([0.9] * 30 + [0.3] * 10, dtype=torch.float64), torch.tensor([0] * 30 + [1] * 10))
    before = m.shares.clone()
    m.update(rel)
    assert m.shares.sum().item() == pytest.approx(1.0)
    moved = m.log_p - before.log()  # each log-share at most max_step before renormalising
    assert (moved[0] - moved[1]).abs().item() == pytest.approx(0.1)
    for _ in range(200):
        m.update(rel)
    assert m.shares[1].item() == pytest.approx(0.1 * 0.25, rel=1e-9)  # floored at 10% of its configured 0.25
    assert (m.multipliers() * m.q).sum().item() == pytest.approx(1.0)  # the weights keep the mean gradient scale
    again = Mixture([3.0, 1.0], cfg)
    again.load_state_dict(m.state_dict())
    assert torch.equal(again.log_p, m.log_p)


def test_a_source_with_no_evidence_keeps_its_configured_share():
    m = Mixture([1.0, 1.0, 2.0], AdaptiveConfig(prior=64.0))
    m.update(SourceReliability(3))
    assert m.shares.tolist() == pytest.approx([0.25, 0.25, 0.5])


def test_metric_names_hold_only_safe_characters_and_stay_distinct():
    assert metric_names(["web/crawl $x$", "a b", "a_b", ""]) == ["web_crawl__x_", "a_b.1", "a_b.2", "_"]


def test_signal_settings_are_checked_together():
    with pytest.raises(ConfigError, match="no signal uses it"):
        load_config(None, ["stats.reference=base"])
    with pytest.raises(ConfigError, match="stats.signals: a list of distinct signals"):
        load_config(None, ["stats.signals=[loss,loss]"])
    with pytest.raises(ConfigError, match="resure.two_sided: true, false, or a list of signals"):
        load_config(None, ["resure.two_sided=[excess]"])
    with pytest.raises(ConfigError, match="data.adaptive.floor: must be in"):
        load_config(None, ["data.adaptive.floor=0"])
    assert load_config(None, ["stats.signals=[loss,excess]"]).stats.reference == "base"


def test_a_resume_that_changes_the_signals_or_the_mixture_is_refused():
    two = Method(load_config(None, ["stats.signals=[loss,excess]"]), [1.0, 1.0])
    with pytest.raises(ValueError, match=r"stats.signals=\['loss', 'excess'\], this run's \['loss'\]"):
        Method(load_config(None, []), [1.0, 1.0]).load_state_dict(two.state_dict())
    fixed = Method(load_config(None, []), [1.0, 1.0])
    with pytest.raises(ValueError, match="data.mixture=fixed, this run's adaptive"):
        Method(load_config(None, ["data.mixture=adaptive"]), [1.0, 1.0]).load_state_dict(fixed.state_dict())
    assert Method(load_config(None, ["data.mixture=adaptive"]), [1.0]).mixture is None  # one source: fixed


@pytest.mark.long
def test_a_source_of_canned_replies_loses_its_share_on_the_embedded_model(tmp_path):
    """A real run (SmolLM2-135M, 1 rank): a clean source and one whose every reply is canned
    boilerplate (a quarter of the draws); both signals, both tails, the adaptive mixture. The canned
    source ends with less than half its configured share."""
    from resure_ds.data.records import read_dialogues
    from tests.e2e_common import launch, metrics

    ds = [d for _, d in zip(range(120), read_dialogues("chitchat", skip_invalid=True))]
    canned = ["I'm sorry, but I can't help with that.", "As an AI language model, I have no opinions.",
              "Thank you for your message! Let me know if there is anything else I can help you with."]
    with open(tmp_path / "clean.jsonl", "w", encoding="utf-8") as f:
        for d in ds[:90]:
            f.write(json.dumps({"id": d.dialogue_id, "messages": d.messages}) + "\n")
    with open(tmp_path / "canned.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(ds[90:]):
            msgs = [dict(m, content=canned[i % 3]) if m["role"] == "assistant" else m for m in d.messages]
            f.write(json.dumps({"id": d.dialogue_id, "messages": msgs}) + "\n")
    mix = json.dumps([{"path": str(tmp_path / "clean.jsonl"), "weight": 3, "name": "clean"},
                      {"path": str(tmp_path / "canned.jsonl"), "weight": 1, "name": "canned"}])
    launch("train.sh", ["recipes/default.yaml", f"data.train={mix}", "data.max_length=96", "data.overflow=cut",
                        "train.micro_batch_size=8", "train.max_steps=14", "train.lr=1e-4", "train.lr_warmup_steps=0",
                        "resure.min_count=8", "stats.signals=[loss,excess]", "resure.two_sided=true",
                        "resure.threshold=quantile", "resure.weight_fn=hard", "resure.down_share=0.2",
                        "data.mixture=adaptive", "train.zero_stage=0", "checkpoint.every=0", "checkpoint.export=false",
                        "output.report_to=none", "output.plot=false", "output.report=false", "data.num_workers=0",
                        f"data.prepared_dir={tmp_path / 'prep'}", f"output.dir={tmp_path}", "output.name=run"],
           extra_env={"NUM_PROCS": "1"})
    last = metrics(tmp_path / "run")[-1]
    assert last["source_share/canned"] < 0.5 * 0.25, last["source_share/canned"]
    assert last["source/canned/reliability"] < last["source/clean/reliability"]


def test_a_reliable_small_source_is_held_under_its_ceiling():
    m = Mixture([1.0, 1.0, 98.0], AdaptiveConfig(strength=10.0, floor=0.5, max_step=10.0, prior=0.0))
    rel = SourceReliability(3)
    rel.sync_update(torch.tensor([1.0] * 10 + [0.2] * 10 + [0.6] * 10, dtype=torch.float64),
                    torch.tensor([0] * 10 + [1] * 10 + [2] * 10))
    for _ in range(5):
        m.update(rel)
    mult = m.multipliers()
    assert mult[0].item() == pytest.approx(2.0) and mult[1].item() == pytest.approx(0.5)  # 1 / floor and floor
    assert m.shares.sum().item() == pytest.approx(1.0)


def test_the_bounded_shares_are_the_exact_projection():
    """clip(exp(x + c), floor q, q / floor) summing to 1: a source pinned low at one scale is freed when
    a high one is capped (an earlier version pinned both at once and broke its own bounds)."""
    m = Mixture([1.0, 1.0, 1.0, 1.0], AdaptiveConfig(floor=0.5))
    got = m._bounded(torch.tensor([0.7, 0.12, 0.1, 0.08], dtype=torch.float64).log()).exp()
    assert got.tolist() == pytest.approx([0.5, 0.2, 0.1 / 0.3 * 0.5, 0.08 / 0.3 * 0.5], abs=1e-9)
    m = Mixture([0.05, 0.95], AdaptiveConfig(floor=0.1))
    got = m._bounded(torch.tensor([0.999, 0.001], dtype=torch.float64).log()).exp()
    assert got.tolist() == pytest.approx([0.5, 0.5], abs=1e-9)  # 10 x its configured 0.05, and the rest
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        q = torch.rand(5, generator=g, dtype=torch.float64) + 0.01
        m = Mixture(q.tolist(), AdaptiveConfig(floor=0.3))
        t = m._bounded(torch.randn(5, generator=g, dtype=torch.float64) * 4).exp()
        assert t.sum().item() == pytest.approx(1.0) and ((t / m.q) >= 0.3 - 1e-9).all() and ((t / m.q) <= 1 / 0.3 + 1e-9).all()


def test_a_source_with_no_weighed_turn_is_unknown_not_unreliable_even_without_a_prior():
    m = Mixture([1.0, 1.0, 1.0], AdaptiveConfig(prior=0.0, max_step=10.0))
    rel = SourceReliability(3)
    rel.sync_update(torch.tensor([0.95, 0.9], dtype=torch.float64), torch.tensor([0, 2]))
    m.update(rel)
    r = rel.pooled()
    assert m.multipliers()[1].item() > 0.5 and abs(r - 0.925) < 1e-12  # it sits at the pooled value


def test_metric_names_never_collide_with_a_label_that_looks_like_a_suffix():
    names = metric_names(["a b", "a_b", "a_b.1"])
    assert len(set(names)) == 3 and names[2] == "a_b.1"


def test_length_scaled_statistics_get_the_token_counts_through_the_method():
    """stats.length_scaled weighs each turn by its trained tokens in the Welford merge (the method once
    merged unit weights, and every long turn's z came out inflated by sqrt(tokens))."""
    from resure_ds.stats.welford import Welford

    c = load_config(None, ["stats.length_scaled=true", "stats.num_buckets=1"])
    m = Method(c)
    g = torch.Generator().manual_seed(0)
    loss = (2 + 0.3 * torch.randn(4, 5, generator=g, dtype=torch.float64))
    count = torch.randint(5, 200, (4, 5), generator=g)
    turns = TurnLosses(loss.clone(), count, loss)
    m.merge(m.statistic(turns, None), count > 0, "cpu", count=count)
    want = Welford(1, length_scaled=True)
    want.sync_update(loss.reshape(-1), torch.zeros(20, dtype=torch.long), counts=count.reshape(-1))
    assert torch.allclose(m.stats.state, want.state, rtol=1e-12)
