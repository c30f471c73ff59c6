import numpy as np
import pytest

from resure_ds.data.collate import collate_examples
from resure_ds.data.records import Dialogue
from resure_ds.data.render import Renderer
from resure_ds.data import IGNORE
from resure_ds.errors import DataError
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
        ids, tid, lab = ex.input_ids, ex.turn_ids, ex.labels
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
    last_start = int(np.flatnonzero(full.turn_ids == 1)[0])
    ex = Renderer(tokenizer, last_start + 2).render(d)
    assert ex.partial.tolist() == [False, True]
    assert len(ex.input_ids) == last_start + 2
    # cut before the first assistant token: nothing to train on
    first = int(np.flatnonzero(full.turn_ids == 0)[0])
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
    b = collate_examples(exs, tokenizer.pad_token_id)
    B, S = b["input_ids"].shape
    assert B == len(exs) and S == max(len(e.input_ids) for e in exs)
    assert b["doc_ids"][:, 0].tolist() == list(range(B))
    assert b["partial"].shape == (B, 2)
    assert b["dialogue_ids"] == [e.dialogue_id for e in exs]
    for i, e in enumerate(exs):
        n = len(e.input_ids)
        assert b["attention_mask"][i].sum() == n
        assert (b["labels"][i, n:] == IGNORE).all() and (b["turn_ids"][i, n:] == -1).all()


def test_template_refusal_is_counted_under_skip_invalid(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('no system') }}{% endif %}{{ m['content'] }}{% endfor %}")
    skipped = {}
    out = Renderer(tok, 512).render_many(dialogues(), skipped)
    assert skipped == {"template_refused": 1} and len(out) == len(dialogues()) - 1


@pytest.mark.parametrize("max_length", [48, 256, 100000])
def test_single_rendering_gives_the_prefix_definition_of_spans(renderer, max_length):
    """The fast path (one rendering + a cached layout per role sequence) against the defining
    computation (every prefix rendered), on 300 real chitchat dialogues, cut and uncut."""
    from resure_ds.data.records import read_dialogues

    r = Renderer(renderer.tok, max_length)
    ds = [d for _, d in zip(range(300), read_dialogues("chitchat", skip_invalid=True))]
    fast = r.render_many(ds)
    assert r.layouts.cache and all(v is not None for v in r.layouts.cache.values())  # the fast path ran
    for d, ex in zip(ds, fast):
        full = r.template.render(d.messages, False)
        pieces, prev = [], 0
        for t, (s, e) in enumerate(r.prefix_spans(d, full)):
            pieces += [(full[prev:s], -1), (full[s:e], t)]
            prev = e
        pieces.append((full[prev:], -1))
        ref = r.assemble(d.dialogue_id, pieces, r.tokenize([p for p, _ in pieces]))
        if ref is None:
            assert ex is None
            continue
        assert ex.input_ids.tolist() == ref.input_ids.tolist()
        assert ex.turn_ids.tolist() == ref.turn_ids.tolist()
        assert ex.partial.tolist() == ref.partial.tolist()


def test_content_dependent_template_falls_back_to_prefixes(tokenizer):
    """A template that changes its text with the content fails the layout check and still gets
    exact spans from the prefix renderings."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                         "{% if m['content'] | length > 3 %}{{ '[long] ' }}{% endif %}"
                         "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    r = Renderer(tok, 4096)
    d = dialogues()[0]
    ex = r.render(d)
    texts = [tok.decode(ex.input_ids[ex.turn_ids == t].tolist()) for t in range(2)]
    assert texts == ["[long] Hello! How can I help?<|im_end|>", "[long] Blue.<|im_end|>"] or \
        texts == ["Hello! How can I help?<|im_end|>", "Blue.<|im_end|>"]


def test_direct_template_and_batched_tokenizer_equal_the_public_api(renderer):
    """The two shortcuts of the fast path: the compiled template called directly gives
    apply_chat_template's text, and the batched Rust call gives the tokenizer's own ids."""
    from resure_ds.data.records import read_dialogues

    tok = renderer.tok
    assert renderer.template.direct is not None  # the direct path is the one in use
    ds = [d for _, d in zip(range(100), read_dialogues("chitchat", skip_invalid=True))] + dialogues()
    pieces = []
    for d in ds:
        for gen in (False, True):
            assert renderer.template.render(d.messages, gen) == tok.apply_chat_template(d.messages, tokenize=False,
                                                                                   add_generation_prompt=gen)
        pieces += [text for text, _ in renderer.pieces(d, use_head=False)[0]]
    assert renderer.tokenize(pieces) == [tok(p, add_special_tokens=False)["input_ids"] if p else [] for p in pieces]
