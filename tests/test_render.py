import numpy as np
import pytest

from resure_ds.data.collate import collate
from resure_ds.data.records import DataError, Dialogue
from resure_ds.data.render import IGNORE, Renderer
from tests.data_fixtures import OPENAI, SHAREGPT

# Other template styles, on the same tokenizer: Zephyr-like (eos after content,
# role headers as plain text) and Llama-3-like (header tokens, content trimmed).
ZEPHYR = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|endoftext|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
LLAMA3 = ("{{ '<|endoftext|>' }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_sep|>\n\n' + "
          "m['content'] | trim + '<|im_end|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>\n\n' }}{% endif %}")


@pytest.fixture(params=["native", "zephyr", "llama3"])
def renderer(request, tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    if request.param == "zephyr":
        tok.chat_template = ZEPHYR
    elif request.param == "llama3":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_sep|>"]})
        tok.chat_template = LLAMA3
    return Renderer(tok, max_length=4096)


def dialogues():
    out = [Dialogue(r.get("id", "x"), r["messages"], "test") for r in OPENAI]
    out.append(Dialogue("s1", [{"role": "user" if c["from"] == "human" else "assistant", "content": c["value"]}
                               for c in SHAREGPT[0]["conversations"]], "test"))
    out.append(Dialogue("pad", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  spaced  "}],
                        "test"))
    return out


def test_spans_decode_to_assistant_text(renderer):
    tok = renderer.tok
    for d in dialogues():
        ex = renderer.render(d)
        ids, tid, lab = map(np.asarray, (ex.input_ids, ex.turn_ids, ex.labels))
        assistant = [m["content"] for m in d.messages if m["role"] == "assistant"]
        assert len(ex.partial) == len(assistant) and not any(ex.partial)
        for t, text in enumerate(assistant):
            decoded = tok.decode(ids[tid == t].tolist())
            # content (trimmed where the template trims it) followed by exactly one end-of-turn token
            body = text if decoded.startswith(text) else text.strip()
            assert decoded.startswith(body), (decoded, text)
            rest = decoded[len(body):]
            assert rest in tok.all_special_tokens, rest
        assert ((lab == IGNORE) == (tid == -1)).all()
        assert (lab[tid >= 0] == ids[tid >= 0]).all()


def test_truncation_flags_partial_turn(tokenizer):
    d = dialogues()[0]
    full = Renderer(tokenizer, 4096).render(d)
    last_start = full.turn_ids.index(1)
    ex = Renderer(tokenizer, last_start + 2).render(d)
    assert ex.partial == [False, True]
    assert len(ex.input_ids) == last_start + 2
    # cut before the first assistant token: nothing to train on
    first = full.turn_ids.index(0)
    assert Renderer(tokenizer, first).render(d) is None


def test_template_that_refuses_roles_is_a_clear_error(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('no system') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError, match="refused"):
        Renderer(tok, 512).render(dialogues()[0])


def test_collate_pads_and_keeps_ids(tokenizer):
    r = Renderer(tokenizer, 4096)
    exs = [r.render(d) for d in dialogues()]
    b = collate(exs, tokenizer.pad_token_id)
    B, S = b["input_ids"].shape
    assert B == len(exs) and S == max(len(e.input_ids) for e in exs)
    assert b["partial"].shape == (B, 2)
    assert b["dialogue_ids"] == [e.dialogue_id for e in exs]
    for i, e in enumerate(exs):
        n = len(e.input_ids)
        assert b["attention_mask"][i].sum() == n
        assert (b["labels"][i, n:] == IGNORE).all() and (b["turn_ids"][i, n:] == -1).all()
