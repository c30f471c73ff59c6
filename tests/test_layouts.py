"""Record layouts beyond OpenAI and ShareGPT (Alpaca, prompt-completion), data.format, data.columns,
per-source layouts, and what they do to prepare (the cache key, the manifest)."""
import json

import pytest

from resure_ds.config import ConfigError, load_config
from resure_ds.data.records import InvalidRecord, normalise, read_dialogues
from resure_ds.config.parse import Layout, SourceSpec, parse_layout, parse_train
from resure_ds.data.prepare import ensure_prepared
from tests.data_fixtures import write_jsonl

U, A, S = "user", "assistant", "system"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_alpaca_records_become_dialogues():
    assert normalise({"instruction": "Add 2 and 3.", "input": "", "output": "5"})[0] == msgs((U, "Add 2 and 3."), (A, "5"))
    got, own = normalise({"id": 7, "instruction": "Translate.", "input": "chat", "output": "cat", "system": "Be brief."})
    assert got == msgs((S, "Be brief."), (U, "Translate.\n\nchat"), (A, "cat")) and own == 7
    assert normalise({"instruction": "Hi", "input": None, "output": "Hello"})[0] == msgs((U, "Hi"), (A, "Hello"))
    with pytest.raises(InvalidRecord) as e:
        normalise({"instruction": "Hi", "output": 3})
    assert e.value.kind == "non_string_content" and "'output'" in str(e.value)


def test_prompt_completion_as_strings_and_as_messages():
    assert normalise({"prompt": "2+2?", "completion": "4"})[0] == msgs((U, "2+2?"), (A, "4"))
    conv = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
            "completion": [{"role": "assistant", "content": "a"}]}
    assert normalise(conv)[0] == msgs((S, "s"), (U, "q"), (A, "a"))


def test_columns_map_other_field_names():
    lay = parse_layout(None, {"messages": "dialog", "role": "speaker", "content": "text", "id": "uid"}, "")[0]
    rec = {"uid": "x1", "dialog": [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "yo"}]}
    assert normalise(rec, lay) == (msgs((U, "hi"), (A, "yo")), "x1")
    qa = parse_layout("alpaca", {"instruction": "question", "output": "answer"}, "")[0]
    assert normalise({"question": "why?", "answer": "because"}, qa)[0] == msgs((U, "why?"), (A, "because"))


def test_explicit_format_and_unknown_layout_errors_name_the_fix():
    with pytest.raises(InvalidRecord) as e:
        normalise({"messages": []}, Layout("alpaca"))  # data.format wins over detection
    assert e.value.kind == "missing_field" and "'instruction'" in str(e.value) and "data.columns" in str(e.value)
    with pytest.raises(InvalidRecord) as e:
        normalise({"question": "q", "answer": "a"})
    assert e.value.kind == "unknown_layout" and "data.columns" in str(e.value) and "'instruction'" in str(e.value)


def test_per_source_layouts_in_a_mixture_and_config_errors():
    base = parse_layout("auto", {"id": "uid"}, "data.")[0]
    specs, errors = parse_train(["a.jsonl", {"path": "b.jsonl", "format": "alpaca",
                                             "columns": {"output": "answer"}}], base)
    assert not errors
    assert specs[0].layout == base
    assert specs[1].layout == Layout("alpaca", (("id", "uid"), ("output", "answer")))  # entry's columns add
    _, errors = parse_train([{"path": "b.jsonl", "format": "csv", "columns": {"answer": "output"}}])
    assert any("format: must be one of" in e for e in errors) and any("unknown field(s) ['answer']" in e for e in errors)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.format=yaml"])
    assert "data.format: must be one of" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.columns={messages: 3, reply: out}"])
    assert "data.columns: ['messages'] must name a field" in str(e.value) and "unknown field(s) ['reply']" in str(e.value)


def test_prepare_reads_each_layout_and_keys_the_cache_on_it(tmp_path, tiny_model_path, tokenizer):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Name a colour.", "output": "Blue."},
        {"instruction": "Add.", "input": "2 3", "output": "5", "system": "Be terse."}])
    mapped = write_jsonl(tmp_path / "mapped.jsonl", [
        {"q": "Name a fruit.", "a": "Apple."}, {"q": "Name a tree.", "a": "Oak."}])
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Hi", "completion": "Hello!"}])
    train = json.dumps([alpaca, {"path": mapped, "format": "alpaca", "columns": {"instruction": "q", "output": "a"}},
                        pc])
    c = load_config(None, [f"model.path={tiny_model_path}", f"data.train={train}",
                           f"data.prepared_dir={tmp_path / 'prep'}", "data.max_length=96"])
    a, m, p = ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=False)
    assert [x.manifest["counts"]["dialogues"] for x in (a, m, p)] == [2, 2, 1]
    assert m.manifest["source"]["layout"] == {"format": "alpaca", "columns": {"instruction": "q", "output": "a"}}
    # the same file read with another layout is another prepared folder
    c2 = load_config(None, [f"model.path={tiny_model_path}", f"data.train={alpaca}", "data.format=alpaca",
                            f"data.prepared_dir={tmp_path / 'prep'}", "data.max_length=96"])
    [a2] = ensure_prepared(c2, tokenizer, tiny_model_path, workers=1, progress=False)
    assert a2.folder != a.folder and not a2.hit
    # reports read the raw text of a prepared folder back in its layout
    got = list(read_dialogues(SourceSpec(m.folder)))
    assert [d.messages[-1]["content"] for d in got] == ["Apple.", "Oak."]
