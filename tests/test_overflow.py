"""data.overflow: a dialogue longer than max_length under split (every reply trained once, whole, at
its true depth), cut and drop, on real chitchat dialogues, in the renderer and through prepare."""
import numpy as np
import pytest

from resure_ds.data.overflow import OverflowCounts, apply, windows
from resure_ds.data.shards import spans as turn_bounds
from resure_ds.data.records import Dialogue, read_dialogues
from resure_ds.data.render import Renderer
from resure_ds.data.shards import PreparedSource
from tests.test_prepare import cfg, chitchat_jsonl, prepare

L = 96


@pytest.fixture(scope="module")
def full(tokenizer):
    """The whole renderings of 300 real dialogues (most are longer than L tokens)."""
    ds = [d for _, d in zip(range(300), read_dialogues("chitchat", skip_invalid=True))]
    return [e for e in Renderer(tokenizer, None).render_many(ds) if e is not None]


def _at(hay: np.ndarray, needle: np.ndarray) -> list[int]:
    """Every offset where needle is a contiguous slice of hay."""
    n = len(needle)
    return [a for a in range(len(hay) - n + 1) if np.array_equal(hay[a:a + n], needle)]


def test_split_trains_every_reply_once_whole_at_its_true_depth(full):
    long = [e for e in full if len(e.input_ids) > L]
    assert len(long) > 100
    partial_seen = 0
    for e in long:
        rows = windows(e, L)
        turns, starts, ends = turn_bounds(e.turn_ids)
        asks = np.r_[0, ends[:-1]]
        trained = {}
        for r in rows:
            assert len(r.input_ids) <= L and (r.turn_ids >= 0).any()
            offsets = _at(e.input_ids, r.input_ids)  # a slice of the dialogue's own rendering ...
            assert offsets, "a row is not a slice of the rendering"
            a = next(o for o in offsets if np.array_equal(e.turn_ids[o:o + len(r.input_ids)][r.turn_ids >= 0],
                                                          r.turn_ids[r.turn_ids >= 0]))
            rt, rs, re_ = turn_bounds(r.turn_ids)
            assert np.array_equal(rt, np.unique(rt))  # each trained turn one span, in order
            for t, s, x in zip(rt.tolist(), rs.tolist(), re_.tolist()):
                k = int(np.flatnonzero(turns == t)[0])
                assert t not in trained, f"turn {t} of {e.dialogue_id} trained twice"
                trained[t] = r.input_ids[s:x]
                assert a + s == starts[k]  # ... at the turn's own place (its true depth is its id)
                if r.partial[t]:
                    partial_seen += 1
                    assert ends[k] - starts[k] > L and a + x == a + len(r.input_ids) and len(rt) == 1
                else:
                    assert a + x == ends[k]  # whole
            if r.partial.any():
                continue
            assert a + len(r.input_ids) == ends[int(np.flatnonzero(turns == rt[-1])[0])]  # ends at a reply's end
            first = int(np.flatnonzero(turns == rt[0])[0])
            if ends[first] - asks[first] <= L:
                assert a <= asks[first]  # the message the first reply answers is in the row
            assert a == 0 or len(r.input_ids) == L  # filled with as much earlier history as fits
        assert sorted(trained) == turns.tolist()  # every reply, once
        whole = np.concatenate([trained[t] for t in turns.tolist()])
        spans = np.concatenate([e.input_ids[s:x] for s, x in zip(starts, ends)])
        if not partial_seen:
            assert np.array_equal(whole, spans)  # the rows' spans, concatenated, are the rendering's


def test_a_reply_longer_than_max_length_alone_trains_its_start_flagged(tokenizer):
    d = Dialogue("long", [{"role": "user", "content": "Tell me everything."},
                          {"role": "assistant", "content": " ".join(f"word{i}" for i in range(200))},
                          {"role": "user", "content": "Thanks. And briefly?"},
                          {"role": "assistant", "content": "Everything, briefly."}], "mem:0")
    e = Renderer(tokenizer, None).render(d)
    counts = OverflowCounts()
    rows = apply(e, "split", 64, counts)
    assert [r.partial.tolist() for r in rows] == [[True], [False, False]]
    assert counts.to_dict() == {"split": 1, "split_rows": 2, "long_turns": 1, "dropped": 0, "cut": 0}
    first, second = rows
    _, s, _ = turn_bounds(first.turn_ids)
    assert len(first.input_ids) == 64 and s[0] > 0  # the message it answers, then its first tokens
    assert tokenizer.decode(first.input_ids[:s[0]]).count("Tell me everything.") == 1
    assert turn_bounds(second.turn_ids)[0].tolist() == [1]
    assert tokenizer.decode(second.input_ids[second.turn_ids == 1]).startswith("Everything, briefly.")


def test_cut_and_drop(full, tokenizer):
    ds = [d for _, d in zip(range(300), read_dialogues("chitchat", skip_invalid=True))]
    cut = [e for e in Renderer(tokenizer, L).render_many(ds) if e is not None]
    c = OverflowCounts()
    assert [apply(e, "cut", L, c) for e in cut] == [[e] for e in cut]
    assert c.cut == sum(len(e.input_ids) == L for e in cut) > 100
    whole = {e.dialogue_id: e for e in full}
    for a in cut:  # cut is the head of the whole rendering
        assert np.array_equal(a.input_ids, whole[a.dialogue_id].input_ids[:L])
    d = OverflowCounts()
    kept = [r for e in full for r in apply(e, "drop", L, d)]
    assert d.dropped == sum(len(e.input_ids) > L for e in full) and len(kept) == len(full) - d.dropped
    assert all(len(r.input_ids) <= L for r in kept)


@pytest.mark.parametrize("policy", ["split", "cut", "drop"])
def test_prepare_counts_every_record(tmp_path, tiny_model_path, tokenizer, policy):
    chitchat_jsonl(tmp_path / "data", n_files=2, per_file=60)
    [p] = prepare(cfg(tiny_model_path, str(tmp_path / "data"), tmp_path / "prep", f"data.overflow={policy}"),
                  tokenizer, tiny_model_path)
    c, o = p.manifest["counts"], p.manifest["counts"]["overflow"]
    assert c["records"] == 120 == c["dialogues"] + c["no_trained_token"] + o["dropped"] + sum(c["skipped"].values())
    src = PreparedSource(p.folder)
    got = [src.row(i) for i in range(len(src))]
    assert c["rows"] == len(got) and c["dialogues"] == len({r.dialogue_id for r in got})
    assert all(len(r.input_ids) <= 96 for r in got) and p.manifest["overflow"] == policy
    whole = Renderer(tokenizer, None).render_many(list(read_dialogues(str(tmp_path / "data"))))
    every = {(e.dialogue_id, t) for e in whole if e is not None for t in np.unique(e.turn_ids[e.turn_ids >= 0])}
    seen = [(r.dialogue_id, int(t)) for r in got for t in np.unique(r.turn_ids[r.turn_ids >= 0])]
    assert len(seen) == len(set(seen))  # no turn trained twice
    if policy == "split":
        assert set(seen) == every and o["split"] > 0 and c["rows"] == c["dialogues"] - o["split"] + o["split_rows"]
    else:
        assert set(seen) < every
        assert (o["cut"] > 0) == (policy == "cut") and (o["dropped"] > 0) == (policy == "drop")


def test_a_prepared_folder_of_another_overflow_is_refused(tmp_path, tiny_model_path, tokenizer):
    from resure_ds.errors import DataError

    chitchat_jsonl(tmp_path / "data", n_files=1, per_file=20)
    [p] = prepare(cfg(tiny_model_path, str(tmp_path / "data"), tmp_path / "prep"), tokenizer, tiny_model_path)
    assert p.manifest["overflow"] == "split"
    with pytest.raises(DataError, match="prepared with another overflow"):
        prepare(cfg(tiny_model_path, p.folder, tmp_path / "prep", "data.overflow=cut"), tokenizer, tiny_model_path)
    [again] = prepare(cfg(tiny_model_path, p.folder, tmp_path / "prep"), tokenizer, tiny_model_path)
    assert again.hit and again.folder == p.folder
