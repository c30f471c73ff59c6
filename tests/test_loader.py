"""Batches from prepared shards: background workers give exactly the in-loop batches, ranks
partition the global stream, and a cursor restarts it without replay."""
import itertools

import pytest
import torch

from resure_ds.config import load_config
from resure_ds.data.loader import RankBatches, Stream, make_loader
from resure_ds.data.order import Cursor
from resure_ds.data.prepare import ensure_prepared
from tests.test_prepare import chitchat_jsonl


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_model_path, tokenizer):
    tmp = tmp_path_factory.mktemp("loader")
    chitchat_jsonl(tmp / "data", n_files=2, per_file=60)
    cfg = load_config(None, [f"model.path={tiny_model_path}", f"data.train={tmp / 'data'}",
                             f"data.prepared_dir={tmp / 'prep'}", "data.max_length=128",
                             "data.overflow=cut"])  # 117 rows, most shorter than 128: packed several a row
    return ensure_prepared(cfg, tokenizer, tiny_model_path, workers=1, progress=False)[0].folder


def batches(folder, rank=0, world=1, mb=4, workers=0, cursor=Cursor(), packing=True, n=12):
    ds = RankBatches(Stream([folder], [1.0], 5, 128, packing, 64, mb, 2), rank, world, cursor)
    return list(itertools.islice(make_loader(ds, workers, 2, False), n))


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x if torch.is_tensor(x[k])) and \
        [x["dialogue_ids"] for x in a] == [y["dialogue_ids"] for y in b] and \
        [x["cursor"] for x in a] == [y["cursor"] for y in b]


def test_background_workers_give_the_in_loop_batches(folder):
    inline = batches(folder, n=30)  # 120 rows: more than the corpus' 117 dialogues
    assert same(inline, batches(folder, workers=2, n=30))
    b = inline[0]
    assert "position_ids" in b and "attention_mask" not in b
    assert sum(len(x["dialogue_ids"]) for x in inline) > 30 * 4  # rows holding several dialogues
    assert inline[-1]["cursor"]["rows_seen"] == 30 * 4 and inline[-1]["cursor"]["epoch"] >= 1  # wraps epochs


def test_ranks_split_each_micro_step_and_a_cursor_resumes(folder):
    whole = batches(folder, mb=4, n=6)
    halves = [batches(folder, rank=r, world=2, mb=2, n=6) for r in (0, 1)]
    for w, h0, h1 in zip(whole, *halves):
        assert w["dialogue_ids"] == h0["dialogue_ids"] + h1["dialogue_ids"]
        assert h0["cursor"] == h1["cursor"] == w["cursor"]  # one global position on every rank
    resumed = batches(folder, mb=4, n=3, cursor=Cursor(**whole[2]["cursor"]))
    assert same(whole[3:], resumed)


def test_padded_rows_hold_one_dialogue(folder):
    b = batches(folder, packing=False, n=1)[0]
    assert len(b["dialogue_ids"]) == 4 and "attention_mask" in b
    assert (b["doc_ids"].max(dim=1).values == torch.arange(4)).all()
