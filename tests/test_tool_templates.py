"""Tool-call dialogues on real chat templates (tests/fixtures/templates, as the models ship them):
never a silently wrong span. Each template either trains every turn right (the tokens are the
template's own rendering; each calling turn trains exactly its call as the template writes it,
through its end marker; no tool output is trained) or refuses the dialogue with its cause.

The checks here read the trained tokens back, independently of the renderer's own check
(benchmarks/tool_templates.py's judge, which the benchmark runs over every template TRL ships)."""
import os

import pytest

from benchmarks.tool_templates import DIALOGUES, judge, run, summary, template_tokenizer
from resure_ds.data.records import Dialogue, normalise, record_tools
from resure_ds.data.render import Renderer
from resure_ds.errors import DataError
from tests.conftest import ROOT

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "templates")
AGENT, PARALLEL = DIALOGUES["two calls, replies between"], DIALOGUES["two calls in one message"]

# template -> the first calling turn's trained text, exactly (the call through its end marker)
TRAINS = {
    # Gemma 4 writes the tool's response inside the model's own turn: the call trains (through the
    # `<|tool_response>` it writes after a call when no response follows), the response is context
    "gemma4": '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>',
    # DeepSeek V3 concatenates the arguments as text: they are passed to it as JSON text
    "deepseekv3": ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n'
                   '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>'),
    # gpt-oss's harmony format: the model writes the routing header, the channel and the call
    "gptoss": 'to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
    "qwen3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
    "llama3_1": '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
}
# template -> (refusal kind, words of its message) for the agent dialogue
REFUSES = {
    "llama3": ("template_drops_calls", "does not render tool calls"),
    "lfm2": ("template_drops_calls", "does not write assistant turn 0's tool call"),
    "phi3": ("template_drops_calls", "does not render tool calls"),
    "gemma3": ("template_refused", "Conversation roles must alternate"),
}


@pytest.fixture(scope="module")
def base(tokenizer):
    return tokenizer


def renderer(base, name, max_length=8192):
    with open(os.path.join(FIXTURES, f"{name}.jinja"), encoding="utf-8") as f:
        return Renderer(template_tokenizer(base, f.read()), max_length)


def agent():
    messages, _ = normalise(AGENT)
    return Dialogue("d", messages, "test", record_tools(AGENT))


@pytest.mark.parametrize("name", sorted(TRAINS))
def test_calling_turns_train_exactly_the_call_and_never_a_tool_output(base, name):
    r = renderer(base, name)
    verdict, first_call = judge(r, AGENT)
    assert verdict == "trained", first_call
    assert first_call == TRAINS[name]
    ex = r.render(agent())
    trained = r.tok.decode(ex.input_ids[ex.turn_ids >= 0].tolist())
    assert "celsius" not in trained and "fahrenheit\": 39" not in trained  # no tool output, anywhere


@pytest.mark.parametrize("name", sorted(REFUSES))
def test_templates_that_cannot_render_calls_or_tools_are_refused_with_the_cause(base, name):
    kind, words = REFUSES[name]
    r = renderer(base, name)
    with pytest.raises(DataError, match=words):
        r.render(agent())
    skipped = {}
    assert r.render_many([agent()], skipped) == [] and skipped == {kind: 1}  # data.skip_invalid: counted


def test_two_calls_in_one_message(base):
    """A template that writes both calls trains both in the one turn; one that writes only the first
    (gpt-oss's harmony format sends one call per message) or refuses parallel calls (Llama 3.1) is a
    refusal, never a turn that trains half of its calls."""
    verdict, call = judge(renderer(base, "qwen3"), PARALLEL)
    assert verdict == "trained" and "get_weather" in call and "search_flights" in call and "Berlin" in call
    verdict, why = judge(renderer(base, "gptoss"), PARALLEL)
    assert verdict == "refused" and "'search_flights' is not in the trained text" in why
    verdict, why = judge(renderer(base, "llama3_1"), PARALLEL)
    assert verdict == "refused" and "only supports single tool-calls" in why


def test_the_benchmark_over_the_fixtures_finds_nothing_wrong(base):
    """benchmarks/tool_templates.py on the suite's fixtures: no dialogue trained wrong, and each family
    that can render calls trains them."""
    results = run(FIXTURES)
    assert not [(n, k, d) for n, res in results.items() for k, (v, d) in res.items() if v == "WRONG"]
    rows = {r["family"]: r for r in summary(results)}
    for name in TRAINS:
        assert rows[name]["verdicts"]["trained"] >= 1, rows[name]
    for name in REFUSES:
        assert rows[name]["verdicts"]["trained"] == 0, rows[name]
