"""The held-out validation split (data.eval as a fraction) and the validation summary."""
import numpy as np

from resure_ds.data.holdout import held_out
from resure_ds.data.order import Plan
from resure_ds.eval.depth import NLL, TOKENS, TURN_MEANS, TURNS, summarize


def test_split_is_a_stable_function_of_the_id():
    ids = [f"dlg-{i}" for i in range(20000)]
    m = held_out(ids, 0.05)
    assert 0.045 < m.mean() < 0.055
    assert np.array_equal(m, held_out(list(reversed(ids)), 0.05)[::-1])  # order does not matter
    assert not (held_out(ids, 0.02) & ~m).any()  # a smaller fraction is a subset
    assert held_out(["\udc31"], 0.5).shape == (1,)  # any id hashes, lone surrogates included


def test_held_out_dialogues_are_never_drawn():
    rng = np.random.default_rng(0)
    lengths = [rng.integers(5, 100, 400).astype(np.int32), rng.integers(5, 100, 200).astype(np.int32)]
    keep = [np.flatnonzero(rng.random(400) > 0.1), np.flatnonzero(rng.random(200) > 0.1)]
    p = Plan(lengths, [1.0, 1.0], 3, 256, True, window=64, keep=keep)
    allowed = set(keep[0].tolist()) | set((keep[1] + 400).tolist())
    for epoch in range(3):
        drawn = np.concatenate([r for w in range(p.windows_per_epoch) for r in p.window_rows(epoch, w)])
        assert set(drawn.tolist()) <= allowed and len(drawn) == len(allowed)


def test_summary_is_per_depth_and_overall():
    total = np.zeros((4, 4))
    total[0] = [20.0, 10, 4, 8.0]  # NLL, tokens, turns, sum of turn means
    total[1] = [9.0, 3, 2, 6.0]
    assert (NLL, TOKENS, TURNS, TURN_MEANS) == (0, 1, 2, 3)
    s = summarize(total, dialogues=4)
    assert s["val_loss"] == 29 / 13 and s["val_turn_loss"] == 14 / 6
    assert s["val_depth_loss"] == [2.0, 3.0] and s["val_depth_turn_loss"] == [2.0, 3.0]
    assert s["val_depth_turns"] == [4, 2] and s["val_turns"] == 6 and s["val_tokens"] == 13
