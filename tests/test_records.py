import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resure_ds.data.chitchat import chitchat_records
from resure_ds.data.records import SkipCounter, read_dialogues
from resure_ds.errors import DataError
from tests.data_fixtures import OPENAI, SHAREGPT, write_jsonl


def test_jsonl_both_layouts_and_ids(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", OPENAI + SHAREGPT)
    ds = list(read_dialogues(path))
    assert [d.dialogue_id for d in ds] == ["a1", "d.jsonl:2", "s1"]
    assert ds[2].messages[1] == {"role": "assistant", "content": "Why did the chicken cross the road?"}
    assert ds[2].messages[0]["role"] == "user"


def test_json_parquet_and_hf_dataset_agree(tmp_path):
    import datasets

    recs = OPENAI + OPENAI
    (tmp_path / "d.json").write_text(json.dumps(recs))
    pq.write_table(pa.Table.from_pylist([{"id": f"r{i}", "messages": r["messages"]} for i, r in enumerate(recs)]),
                   tmp_path / "d.parquet")
    ds = datasets.Dataset.from_list([{"id": f"r{i}", "messages": r["messages"]} for i, r in enumerate(recs)])
    ds.save_to_disk(str(tmp_path / "hf"))
    from_json = [d.messages for d in read_dialogues(str(tmp_path / "d.json"))]
    for src in (str(tmp_path / "d.parquet"), str(tmp_path / "hf"), ds):
        got = list(read_dialogues(src))
        assert [d.messages for d in got] == from_json
        assert [d.dialogue_id for d in got] == ["r0", "r1", "r2", "r3"]


BAD = [
    ('{"messages": []}', "empty_conversation", "the conversation is empty"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown_role", "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": 5}]}', "non_string_content", "of type int, not a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no_assistant_turn", "no assistant message"),
    ('{"messages": [{"role": "user", "content": "hi"}', "malformed_json", "malformed JSON"),
    ('{"conversations": [{"from": "alien", "value": "x"}]}', "unknown_role", "unknown role 'alien'"),
]


@pytest.mark.parametrize("line,kind,text", BAD)
def test_bad_record_clear_error(tmp_path, line, kind, text):
    path = write_jsonl(tmp_path / "bad.jsonl", OPENAI, raw_lines=[line])
    with pytest.raises(DataError) as e:
        list(read_dialogues(path))
    msg = str(e.value)
    assert "bad.jsonl line 3" in msg and text in msg and "data.skip_invalid=true" in msg


def test_skip_invalid_counts_exactly(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", OPENAI, raw_lines=[b[0] for b in BAD] + [BAD[3][0]])
    skipped = SkipCounter()
    ds = list(read_dialogues(path, skip_invalid=True, skipped=skipped))
    assert len(ds) == 2
    assert skipped == {"empty_conversation": 1, "unknown_role": 2, "non_string_content": 1,
                       "no_assistant_turn": 2, "malformed_json": 1}


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        list(read_dialogues(str(tmp_path / "nope.jsonl")))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type"):
        list(read_dialogues(str(tmp_path / "x.csv")))


def test_chitchat_embedded_corpus():
    recs = list(chitchat_records())
    assert len(recs) == 7168
    key, rec = recs[0]
    roles = [m["role"] for m in rec["messages"]]
    assert roles[0] == "user" and set(roles) <= {"user", "assistant"}
    assert all(a != b for a, b in zip(roles, roles[1:]))  # one sender per turn, alternating
    assert "whats up MD\nim doing good\nhow are you doing?" == rec["messages"][1]["content"]
    skipped = SkipCounter()
    n = sum(1 for _ in read_dialogues("chitchat", skip_invalid=True, skipped=skipped))
    assert n + skipped["no_assistant_turn"] == 7168 and n > 4000
