"""Per-message control in the records: train flags and data weights (message and record level),
reasoning_content on assistant messages; their spans, their shards and what bad values say.
(The weights in the loss and the statistics on 2 ranks: test_grad_equivalence.py.)"""
import math

import numpy as np
import pytest

from resure_ds.config.parse import Layout, SourceSpec
from resure_ds.data.collate import collate
from resure_ds.data.records import Dialogue, read_dialogues, to_dialogue
from resure_ds.data.render import Renderer
from resure_ds.data.shards import PreparedSource
from resure_ds.data.sources import Unit
from resure_ds.errors import DataError, InvalidRecord
from tests.data_fixtures import write_jsonl
from tests.test_prepare import cfg, prepare
from tests.test_templates import family_tokenizer

U, A = "user", "assistant"
UNIT = Unit("mem", "mem", 0, 0, 0)


def rec(*turns, **extra):
    return {"messages": [{"role": r, "content": c, **kw} for r, c, kw in turns], **extra}


def dialogue(record, layout=Layout()):
    return to_dialogue(Unit("mem", "mem", 0, 0, 0, layout) if layout != Layout() else UNIT, "line 1", record)


DIALOGUE = rec((U, "Hi there!", {}), (A, "Hello! How can I help?", {"train": False}),
               (U, "Name a colour.", {}), (A, "Blue.", {"weight": 0.5}),
               (U, "Another?", {}), (A, "Green.", {}), weight=2)


def test_flags_and_weights_become_per_turn_data_weights_off_the_messages():
    d = dialogue(DIALOGUE)
    assert d.weights == (0.0, 1.0, 2.0)  # train false; 0.5 x the record's 2; 1 x 2
    assert d.plain and all(set(m) == {"role", "content"} for m in d.messages)  # the fast path still renders it
    assert dialogue(rec((U, "a", {}), (A, "b", {}))).weights is None
    # axolotl's layout: weight 0 on the human turns, 1 on the model's; ShareGPT keys the same way
    sg = {"conversations": [{"from": "human", "value": "a", "weight": 0}, {"from": "gpt", "value": "b", "weight": 1},
                            {"from": "human", "value": "c", "weight": 0}, {"from": "gpt", "value": "d", "weight": 0}]}
    assert dialogue(sg).weights == (1.0, 0.0)
    mapped = dialogue({"messages": [{"role": U, "content": "a"}, {"role": A, "content": "b", "loss": False}]},
                      Layout(columns=(("train", "loss"),)))
    assert mapped.weights == (0.0,)


@pytest.mark.parametrize("record,match", [
    (rec((U, "a", {}), (A, "b", {"weight": -1})), "weight -1; expected a finite number in \\[0, 1000\\]"),
    (rec((U, "a", {}), (A, "b", {"weight": 10 ** 400})), "weight 1000000000000000000000000000000000000..."),
    (rec((U, "a", {}), (A, "b", {"weight": 1e30})), "weight 1e\\+30"),
    (rec((U, "a", {}), (A, "b", {"weight": 20}), weight=100), "record's weight 100 times a message's 20 is over 1000"),
    (rec((U, "a", {}), (A, "b", {"weight": float("nan")})), "weight nan"),
    (rec((U, "a", {}), (A, "b", {"weight": "high"})), "weight 'high'"),
    (rec((U, "a", {}), (A, "b", {"weight": True})), "weight True"),
    (rec((U, "a", {}), (A, "b", {"train": "no"})), "train='no'; expected true or false"),
    (rec((U, "a", {"train": True}), (A, "b", {})), "message 0 \\(user\\) asks to be trained"),
    (rec((U, "a", {"weight": 1}), (A, "b", {})), "only assistant messages train"),
    (rec((U, "a", {}), (A, "b", {}), weight=math.inf), "the record has weight inf"),
    (rec((U, "a", {}), (A, "b", {"reasoning_content": 3})), "reasoning_content of type int"),
])
def test_bad_controls_name_the_message_and_the_fix(record, match):
    with pytest.raises(InvalidRecord, match=match) as e:
        dialogue(record)
    assert e.value.kind in ("bad_weight", "non_string_content")


def test_a_context_only_reply_renders_the_same_tokens_untrained(tokenizer):
    r = Renderer(tokenizer, 4096)
    d = dialogue(DIALOGUE)
    plain = r.render(Dialogue(d.dialogue_id, d.messages, d.where))
    ex = r.render(d)
    assert np.array_equal(ex.input_ids, plain.input_ids)
    assert np.array_equal(ex.turn_ids, np.where(plain.turn_ids == 0, -1, plain.turn_ids))
    assert tokenizer.decode(ex.input_ids[ex.turn_ids == 1]) == "Blue.<|im_end|>"
    assert ex.weights.tolist() == [0.0, 1.0, 2.0]
    # every reply context only: nothing to train, counted like a dialogue max_length left empty
    none = rec((U, "a", {}), (A, "b", {"train": False}))
    assert r.render(dialogue(none)) is None


def test_weights_survive_prepare_split_and_collate(tmp_path, tiny_model_path, tokenizer):
    long = rec(*[x for i in range(12) for x in ((U, f"Question {i}: what is {i} squared?", {}),
                                                (A, f"It is {i * i}, as {i} times {i}.", {"weight": 0.5 + i}))])
    write_jsonl(tmp_path / "d.jsonl", [{**DIALOGUE, "id": "short"}, {**long, "id": "long"}])
    [p] = prepare(cfg(tiny_model_path, str(tmp_path / "d.jsonl"), tmp_path / "prep"), tokenizer, tiny_model_path)
    src = PreparedSource(p.folder)
    rows = [src.row(i) for i in range(len(src))]
    assert p.manifest["counts"]["overflow"]["split"] == 1 and len(rows) > 2  # the long one split at 96 tokens
    seen = {}
    for r in rows:
        for t in np.unique(r.turn_ids[r.turn_ids >= 0]).tolist():
            seen[(r.dialogue_id, t)] = float(r.weights[t])
    assert seen == {("short", 1): 1.0, ("short", 2): 2.0, **{("long", i): 0.5 + i for i in range(12)}}
    b = collate([[r] for r in rows], 0, packed=False)
    for d, r in enumerate(rows):
        for t in np.unique(r.turn_ids[r.turn_ids >= 0]).tolist():
            assert b["data_weight"][d, t].item() == seen[(r.dialogue_id, t)]
    short = [r for r in rows if r.dialogue_id == "short"]
    assert len(short) == 1 and collate([short], 0, packed=True)["data_weight"][0].tolist() == [1.0, 1.0, 2.0]


def test_a_bad_weight_stops_prepare_naming_the_record(tmp_path, tiny_model_path, tokenizer):
    write_jsonl(tmp_path / "d.jsonl", [DIALOGUE, rec((U, "a", {}), (A, "b", {"weight": -2}))])
    with open(tmp_path / "d.jsonl", "a", encoding="utf-8") as f:  # an integer no float holds: counted too
        f.write('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 1'
                + "0" * 400 + "}]}\n")
    with pytest.raises(DataError, match=r"d\.jsonl line 2.*weight -2"):
        prepare(cfg(tiny_model_path, str(tmp_path / "d.jsonl"), tmp_path / "prep"), tokenizer, tiny_model_path)
    [p] = prepare(cfg(tiny_model_path, str(tmp_path / "d.jsonl"), tmp_path / "prep", "data.skip_invalid=true"),
                  tokenizer, tiny_model_path)
    assert p.manifest["counts"]["skipped"] == {"bad_weight": 2}


THINK = rec((U, "What is 17 * 3?", {}),
            (A, "51.", {"reasoning_content": "17 * 3 = 10 * 3 + 7 * 3 = 30 + 21 = 51."}),
            (U, "And 17 * 4?", {}),
            (A, "68.", {"reasoning_content": "17 * 4 = 51 + 17 = 68."}))


@pytest.mark.parametrize("train_reasoning", [True, False])
def test_qwen3_reasoning_trains_with_the_reply_or_stays_context(tokenizer, train_reasoning):
    tok = family_tokenizer(tokenizer, "qwen3")
    r = Renderer(tok, 4096, train_reasoning)
    d = dialogue(THINK)
    ex = r.render(d)
    text = tok.apply_chat_template(d.messages, tokenize=False)
    assert tok.decode(ex.input_ids) == text  # what the model sees for the whole dialogue
    assert "17 * 4 = 51 + 17 = 68." in text and "10 * 3 + 7 * 3" not in text  # Qwen3 keeps the last reasoning only
    last = tok.decode(ex.input_ids[ex.turn_ids == 1])
    if train_reasoning:
        assert last == "17 * 4 = 51 + 17 = 68.\n</think>\n\n68.<|im_end|>"
    else:
        assert last == "68.<|im_end|>"
    assert tok.decode(ex.input_ids[ex.turn_ids == 0]) == "51.<|im_end|>"
    assert r.notes == {"reasoning_not_rendered": 1}  # the first reply's, which Qwen3 leaves out


def test_prepare_counts_reasoning_the_template_leaves_out(tmp_path, tiny_model_path, tokenizer):
    write_jsonl(tmp_path / "d.jsonl", [THINK])
    [p] = prepare(cfg(tiny_model_path, str(tmp_path / "d.jsonl"), tmp_path / "prep"), tokenizer, tiny_model_path)
    assert p.manifest["counts"]["reasoning_not_rendered"] == 2  # SmolLM2's template renders none
    d = next(read_dialogues(SourceSpec(str(tmp_path / "d.jsonl"))))
    assert d.messages[1]["reasoning_content"].startswith("17 * 3")
