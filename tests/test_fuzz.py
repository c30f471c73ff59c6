"""Fuzz: 5,000 generated JSONL records (fixed seed), valid, odd and broken, through the readers, the
validator and the renderer via `prepare`. Only located DataErrors or counted skips come out, never
another exception; every record is accounted for; and a training run over the corpus completes."""
import json
import os
import random

import pytest

from resure_ds.data import sources
from resure_ds.errors import DataError
from tests.data_fixtures import OPENAI, SHAREGPT, write_jsonl
from tests.e2e_common import launch, metrics
from tests.test_prepare import cfg, prepare

N = 5000
TEXTS = ["hi", "Hello there!", "¿Qué tal?", "日本語のテキスト", "emoji 🎉🔥", "tab\tand\nnewline", "nul \u0000 byte",
         "rtl \u202e text", "<|im_end|> fake marker", "{{ jinja }} {% raw %}", " ", "x" * 3000, "\u00e9" * 50]


def msg(role, text, sharegpt=False):
    return {"from": {"user": "human", "assistant": "gpt"}.get(role, role), "value": text} if sharegpt else \
        {"role": role, "content": text}


def valid(rng, sharegpt=False):
    turns = [msg("system", rng.choice(TEXTS), sharegpt)] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 4)):
        turns += [msg("user", rng.choice(TEXTS), sharegpt), msg("assistant", rng.choice(TEXTS), sharegpt)]
    return {"conversations" if sharegpt else "messages": turns}


def dumps(rec) -> bytes:
    return json.dumps(rec, ensure_ascii=bool(random.getrandbits(1))).encode("utf-8")


# kind -> make(rng) -> line bytes; the reader must report exactly this kind (None: any outcome but a crash)
BROKEN = {
    "bad_encoding": lambda r: dumps(valid(r)).replace(b'"content": "', b'"content": "\xff\xfe', 1),
    "malformed_json": lambda r: r.choice([dumps(valid(r))[:-r.randint(1, 20)], dumps(valid(r)) + b" trailing",
                                          b'{"messages": NaN}', b"[" * 100000 + b"]" * 100000,
                                          b'{"messages": [{"role": "user", "content": Infinity}]}']),
    "bad_text": lambda r: b'{"messages": [{"role": "user", "content": "a \\udc31 b"}, '
                          b'{"role": "assistant", "content": "ok"}]}',
    "non_string_content": lambda r: json.dumps({"messages": [msg("user", "q"), {"role": "assistant", "content":
                                                                              r.choice([1, None, [], {}])}]}).encode(),
    "not_an_object": lambda r: r.choice([b"null", b"42", b'"text"', b"[1, 2]", b"true"]),
    "unknown_layout": lambda r: b'{"text": "a plain document"}',
    "empty_conversation": lambda r: r.choice([b'{"messages": []}', b'{"conversations": {}}']),
    "bad_message": lambda r: b'{"messages": ["just a string", {"role": "assistant", "content": "x"}]}',
    "unknown_role": lambda r: b'{"messages": [{"role": "robot", "content": "x"}]}',
    "no_assistant_turn": lambda r: dumps({"messages": [msg("user", r.choice(TEXTS))]}),
    "odd_but_valid": lambda r: dumps({"messages": r.choice([[msg("assistant", "I open."), msg("user", "ok")],
                                                            [msg("user", "a"), msg("user", "b"), msg("assistant", "c")],
                                                            [msg("user", "a"), msg("assistant", "b"),
                                                             msg("system", "mid"), msg("assistant", "c")]]),
                                      "id": r.choice([None, 7, "dup", {"x": 1}])}),
}
EXACT = [k for k in BROKEN if k != "odd_but_valid"]


def corpus(path, huge: bool):
    """N lines: 70% valid (both layouts), 30% broken of every kind; returns kind -> count."""
    rng = random.Random(1234)
    random.seed(1234)
    counts = {k: 0 for k in BROKEN}
    with open(path, "wb") as f:
        for i in range(N):
            if rng.random() < 0.7:
                f.write(dumps(valid(rng, sharegpt=rng.random() < 0.4)) + b"\n")
                continue
            kind = EXACT[i % len(EXACT)] if i % 11 else "odd_but_valid"
            counts[kind] += 1
            f.write(BROKEN[kind](rng) + b"\n")
            if rng.random() < 0.02:
                f.write(b"\n   \n")  # blank lines are not records
        if huge:  # one line past the record size bound, skipped without holding it in memory
            f.write(b'{"messages": [{"role": "user", "content": "' + b"y" * (sources.MAX_RECORD_BYTES + 10)
                    + b'"}]}\n')
    return counts


def test_every_fuzzed_record_is_counted_or_prepared(tmp_path, tiny_model_path, tokenizer):
    path = tmp_path / "fuzz.jsonl"
    counts = corpus(path, huge=True)
    [p] = prepare(cfg(tiny_model_path, str(path), tmp_path / "prep", "data.skip_invalid=true"), tokenizer,
                  tiny_model_path, workers=2)
    c = p.manifest["counts"]
    skipped = c["skipped"]
    for kind in EXACT:
        assert skipped.get(kind, 0) == counts[kind], (kind, skipped)
    assert skipped.get("huge_record") == 1
    assert c["records"] == N + 1
    assert c["dialogues"] + sum(skipped.values()) + c["no_trained_token"] == c["records"]
    assert c["dialogues"] > 0.6 * N


@pytest.mark.parametrize("kind", EXACT)
def test_each_broken_kind_is_one_located_error(tmp_path, tiny_model_path, tokenizer, kind):
    rng = random.Random(kind)
    path = tmp_path / f"{kind}.jsonl"
    path.write_bytes(dumps(valid(rng)) + b"\n" + BROKEN[kind](rng) + b"\n")
    with pytest.raises(DataError) as e:
        prepare(cfg(tiny_model_path, str(path), tmp_path / "prep"), tokenizer, tiny_model_path)
    assert f"{path} line 2:" in str(e.value) and "data.skip_invalid=true" in str(e.value)


@pytest.mark.slow
def test_training_over_the_fuzzed_corpus_completes(tmp_path, tiny_model_path):
    """Also a validation source given as a path (data.eval), validated every step, the best kept."""
    path = tmp_path / "fuzz.jsonl"
    corpus(path, huge=False)
    val = write_jsonl(tmp_path / "val.jsonl", OPENAI + SHAREGPT)
    launch("train.sh", ["recipes/default.yaml", f"model.path={tiny_model_path}", f"data.train={path}",
                        "data.skip_invalid=true", "train.max_steps=3", "data.max_length=96",
                        "train.micro_batch_size=2", "checkpoint.export=false", f"output.dir={tmp_path}",
                        "output.name=fuzz", f"data.eval={val}", "eval.every=1", "eval.keep_best=true"])
    rows = metrics(os.path.join(tmp_path, "fuzz"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["val_dialogues"] == 3 and r["val_turns"] == 5 for r in rows)
    with open(os.path.join(tmp_path, "fuzz", "best", "resure_best.json"), encoding="utf-8") as f:
        best = json.load(f)
    assert best["val_loss"] == min(r["val_loss"] for r in rows)
    assert best["step"] == min(rows, key=lambda r: r["val_loss"])["step"]
    with open(os.path.join(tmp_path, "fuzz", "summary.txt"), encoding="utf-8") as f:
        summary = f.read()
    assert "malformed_json=" in summary and "bad_encoding=" in summary
    # a dialogue that opens with an assistant message (the template adds its default system prompt
    # before it, so it is not prefix-stable) is located in its one rendering and trained, not skipped
    assert "template_unstable" not in summary and "template_rewrites" not in summary
