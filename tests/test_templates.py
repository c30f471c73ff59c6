"""Real chat templates as their models ship them (tests/fixtures/templates: Qwen3, Llama 3.1,
Mistral v0.3, Gemma 3) on dialogues with a system message, several turns and tool calls.

The tokenizer is SmolLM2's with each family's special tokens added, so the template's markers
are single tokens as in the real model. Checked for every dialogue: the tokens are exactly the
template's own rendering of the whole dialogue (what the model sees at inference), each
assistant turn's trained tokens are its content (or its tool-call text) followed by one
end-of-turn token, and nothing else is trained (tool outputs, headers, the template's own text)."""
import copy
import json
import os

import pytest

from resure_ds.data.records import Dialogue, normalise, record_tools
from resure_ds.data.render import Renderer
from resure_ds.errors import DataError, InvalidRecord
from tests.conftest import ROOT

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "templates")
FAMILIES = {  # template file, bos, eos, the end-of-turn token, special tokens the model has
    "qwen3": ("qwen3.jinja", None, "<|im_end|>", "<|im_end|>",
              ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]),
    "llama3_1": ("llama3_1.jinja", "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>",
                 ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"]),
    "mistral": ("mistral_v0_3.jinja", "<s>", "</s>", "</s>",
                ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                 "[/TOOL_RESULTS]"]),
    "gemma3": ("gemma3.jinja", "<bos>", "<eos>", "<end_of_turn>", ["<start_of_turn>", "<end_of_turn>"]),
}
SYSTEM = {"role": "system", "content": "You are terse."}
PLAIN = [SYSTEM, {"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello. What do you need?"},
         {"role": "user", "content": "The capital of France?"}, {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome, since 1871."}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TOOL_RECORD = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "Is it warm in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call12345", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "{\"celsius\": 21}"},
    {"role": "assistant", "content": "Yes, 21 degrees."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."}]}


def family_tokenizer(tokenizer, family):
    name, bos, eos, _, extra = FAMILIES[family]
    tok = copy.deepcopy(tokenizer)
    special = {"additional_special_tokens": extra}
    if bos:
        special["bos_token"] = bos
    special["eos_token"] = eos
    tok.add_special_tokens(special)
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        tok.chat_template = f.read()
    return tok


def dialogue(record):
    messages, _ = normalise(record)
    return Dialogue("d", messages, "test", record_tools(record))


def check(renderer, d, family):
    """The invariants of the module docstring; returns the trained text of each turn."""
    tok, eot = renderer.tok, FAMILIES[family][3]
    ex = renderer.render(d)
    full = tok.apply_chat_template(d.messages, tools=d.tools, tokenize=False)
    assert tok.decode(ex.input_ids.tolist()) == full  # the whole dialogue, as the template renders it
    assistant = [m for m in d.messages if m["role"] == "assistant"]
    assert sorted(set(ex.turn_ids.tolist()) - {-1}) == list(range(len(assistant)))
    trained = []
    for t, m in enumerate(assistant):
        text = tok.decode(ex.input_ids[ex.turn_ids == t].tolist())
        assert text.endswith(eot) and text.count(eot) == 1, (family, t, text)
        body = text[:-len(eot)]
        if m.get("tool_calls"):
            fn = m["tool_calls"][0]["function"]
            assert fn["name"] in body and json.dumps(fn["arguments"]["city"]) in body, (family, body)
        else:  # a reasoning template keeps only the reply after </think> in the history
            shown = m["content"].rsplit("</think>", 1)[-1]
            assert body.strip() in (m["content"].strip(), shown.strip()), (family, t, body)
        trained.append(body)
    for m in d.messages:  # nothing but assistant text is trained
        if m["role"] != "assistant" and m["content"].strip():
            assert not any(m["content"].strip() in b for b in trained), (family, m)
    return trained


@pytest.mark.parametrize("family", list(FAMILIES))
def test_multi_turn_dialogue_with_a_system_message(tokenizer, family):
    r = Renderer(family_tokenizer(tokenizer, family), 4096)
    d = Dialogue("d", PLAIN, "test")
    check(r, d, family)
    # Qwen3 (<think> only after the last query) and Mistral (system message in the last user turn)
    # rewrite history: the prefix definition refuses them, so the located path did the work.
    # Llama 3.1 and Gemma 3 are prefix-stable.
    try:
        list(r.prefix_spans(d, r.tok.apply_chat_template(PLAIN, tokenize=False)))
        stable = True
    except InvalidRecord as bad:
        stable = False
        assert bad.kind == "template_unstable"
    assert stable == (family in ("llama3_1", "gemma3"))


def test_history_rewriting_templates_get_the_same_spans_from_one_rendering(tokenizer):
    """Where the template is not prefix-stable but keeps its text around each message apart from
    the contents (Qwen3), plain dialogues read their spans off one rendering with that text
    (learned once per role sequence); the located path (a probe rendering per reply) defines
    them: both give the same spans, also for an empty reply (only its end of turn is trained).
    (Mistral's system message moves into the last user turn: no such layout, the located path.)"""
    r = Renderer(family_tokenizer(tokenizer, "qwen3"), 4096)
    empty = [*PLAIN[:4], {"role": "assistant", "content": ""}, *PLAIN[5:]]
    for messages in (PLAIN, empty, PLAIN[1:3]):
        d = Dialogue("d", messages, "test")
        full = r.tok.apply_chat_template(messages, tokenize=False)
        one = r.layouts.spans(d, full, len(messages))
        assert one is not None and one == r.located_spans(d, full)
    check(r, Dialogue("d", empty, "test"), "qwen3")


def test_qwen3_trains_what_the_model_sees_for_the_whole_dialogue(tokenizer):
    r = Renderer(family_tokenizer(tokenizer, "qwen3"), 4096)
    d = Dialogue("d", PLAIN, "test")
    ex = r.render(d)
    # the empty reasoning block sits before the last reply only, and is the template's text, not trained
    untrained = r.tok.decode(ex.input_ids[ex.turn_ids == -1].tolist())
    assert untrained.count("<think>\n\n</think>\n\n") == 1
    last = int((ex.turn_ids == 2).argmax())
    assert r.tok.decode(ex.input_ids[:last].tolist()).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # history with reasoning: the template keeps only the reply after </think>, and that is trained
    with_reasoning = [*PLAIN[:2], {"role": "assistant", "content": "<think>\nGreet.\n</think>\n\nHello."}, *PLAIN[3:]]
    trained = check(r, Dialogue("d", with_reasoning, "test"), "qwen3")
    assert trained[0] == "Hello."


@pytest.mark.parametrize("family", ["qwen3", "llama3_1"])
def test_tool_calls_train_the_call_and_not_the_tool_output(tokenizer, family):
    r = Renderer(family_tokenizer(tokenizer, family), 4096)
    trained = check(r, dialogue(TOOL_RECORD), family)
    assert "celsius" not in "".join(trained)
    if family == "qwen3":
        assert trained[0] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    else:
        assert trained[0] == '{"name": "get_weather", "parameters": {"city": "Paris"}}'


def test_mistral_tool_calls_without_a_tools_list(tokenizer):
    """Mistral v0.3 with a tools list moves it before the last user turn (not prefix-stable) and
    refuses a tool call replaced by text (its role-order check leaves tool calls out): such a
    dialogue is one clear, counted refusal. Without the list the template is prefix-free of that,
    and the call is trained."""
    r = Renderer(family_tokenizer(tokenizer, "mistral"), 4096)
    trained = check(r, dialogue({"messages": TOOL_RECORD["messages"]}), "mistral")
    assert trained[0] == '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call12345"}]'
    with pytest.raises(DataError, match="cannot be located"):
        r.render(dialogue(TOOL_RECORD))
    skipped = {}
    assert r.render_many([dialogue(TOOL_RECORD)], skipped) == [] and skipped == {"template_rewrites": 1}


def test_gemma3_refuses_tool_roles_clearly(tokenizer):
    r = Renderer(family_tokenizer(tokenizer, "gemma3"), 4096)
    with pytest.raises(DataError, match="refused"):
        r.render(dialogue(TOOL_RECORD))


def test_truncation_in_the_located_path_flags_the_cut_turn(tokenizer):
    r = Renderer(family_tokenizer(tokenizer, "qwen3"), 4096)
    d = Dialogue("d", PLAIN, "test")
    full = r.render(d)
    last = int(full.turn_ids.max())
    start = int((full.turn_ids == last).argmax())
    cut = Renderer(r.tok, start + 2).render(d)
    assert cut.partial.tolist() == [False] * last + [True]
    assert (cut.input_ids == full.input_ids[:start + 2]).all()


def test_sharegpt_function_call_and_observation_read_as_the_openai_record():
    sharegpt = {"tools": json.dumps([WEATHER]), "conversations": [
        {"from": "human", "value": "Is it warm in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "{\"celsius\": 21}"},
        {"from": "gpt", "value": "Yes, 21 degrees."}]}
    got = dialogue(sharegpt)
    want = dialogue({"tools": [WEATHER], "messages": TOOL_RECORD["messages"][:4]})
    assert got.tools == want.tools == [WEATHER]
    assert got.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert got.messages[2] == {"role": "tool", "content": "{\"celsius\": 21}"}
    assert want.messages[2] == {"role": "tool", "content": "{\"celsius\": 21}", "tool_call_id": "call12345",
                                "name": "get_weather"}
    assert [m["role"] for m in got.messages] == [m["role"] for m in want.messages]
    assert not got.plain and Dialogue("d", PLAIN, "t").plain


@pytest.mark.parametrize("record, match", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {}}]}]},
     "no function name"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
     "not JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": "f()"}]}, "non-empty list"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "f(x)"}]},
     "not a JSON object"),
    ({"tools": "[{oops", "messages": TOOL_RECORD["messages"]}, "tools field"),
])
def test_bad_tool_records_name_the_problem(record, match):
    from resure_ds.errors import InvalidRecord

    with pytest.raises(InvalidRecord, match=match):
        dialogue(record)


def test_prepare_a_tool_call_corpus_with_a_template_file(tmp_path, tiny_model_path):
    """The whole data path: a JSONL of tool-call records, Qwen3's template given as a file
    (model.chat_template=PATH), prepared shards whose trained tokens are the calls and replies."""
    from resure_ds.models import load_tokenizer
    from tests.test_prepare import cfg, prepare, rows

    path = tmp_path / "tools.jsonl"
    plain = {"messages": PLAIN}
    path.write_text("\n".join(json.dumps(r) for r in (TOOL_RECORD, plain, TOOL_RECORD)) + "\n")
    template = os.path.join(FIXTURES, "qwen3.jinja")
    c = cfg(tiny_model_path, str(path), tmp_path / "prep", f"model.chat_template={template}", "data.max_length=512")
    tok = load_tokenizer(tiny_model_path, template)
    [p] = prepare(c, tok, tiny_model_path)
    assert p.manifest["counts"]["dialogues"] == 3 and not p.manifest["counts"]["skipped"]
    first = rows(p.folder)[0]
    text = [tok.decode(first.input_ids[first.turn_ids == k].tolist()) for k in range(3)]
    assert text[0].startswith('<tool_call>\n{"name": "get_weather"') and text[0].endswith("</tool_call><|im_end|>")
    assert text[1:] == ["Yes, 21 degrees.<|im_end|>", "You are welcome.<|im_end|>"]
