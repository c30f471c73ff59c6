"""Prepare once: token shards equal the renderer's output, cache hits, rebuilds, every bad record
found before training (located error or counted skip), several workers and several tasks."""
import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from resure_ds.config import load_config
from resure_ds.data.records import SkipCounter, read_dialogues
from resure_ds.data.render import Renderer
from resure_ds.data.shards import PreparedSource
from resure_ds.errors import DataError
from resure_ds.data.prepare import ensure_prepared
from tests.conftest import ROOT
from tests.data_fixtures import OPENAI, write_jsonl
from tests.test_records import BAD


def chitchat_jsonl(folder, n_files=3, per_file=80):
    """Real chitchat dialogues as JSONL shards in a folder (one nested), OpenAI layout."""
    ds = [d for _, d in zip(range(n_files * per_file), read_dialogues("chitchat", skip_invalid=True))]
    paths = []
    for i in range(n_files):
        sub = folder / ("nested" if i == n_files - 1 else "")
        sub.mkdir(parents=True, exist_ok=True)
        paths.append(write_jsonl(sub / f"part-{i}.jsonl", [{"id": d.dialogue_id, "messages": d.messages}
                                                             for d in ds[i * per_file:(i + 1) * per_file]]))
    return paths


def cfg(model, data, prepared, *extra):
    train = data if isinstance(data, str) else json.dumps(data)
    return load_config(None, [f"model.path={model}", f"data.train={train}", f"data.prepared_dir={prepared}",
                              "data.max_length=96", *extra])


def prepare(c, tokenizer, model, workers=1):
    return ensure_prepared(c, tokenizer, model, workers=workers, progress=False)


def rows(folder):
    src = PreparedSource(folder)
    return [src.row(i) for i in range(len(src))]


def test_shards_hold_exactly_the_rendered_dialogues(tmp_path, tiny_model_path, tokenizer):
    chitchat_jsonl(tmp_path / "data")
    c = cfg(tiny_model_path, str(tmp_path / "data"), tmp_path / "prep", "data.overflow=cut")  # split: test_overflow
    [p] = prepare(c, tokenizer, tiny_model_path, workers=2)  # 3 units on 2 worker processes
    assert not p.hit and p.manifest["counts"]["dialogues"] > 200
    expected = [e for e in Renderer(tokenizer, 96).render_many(list(read_dialogues(str(tmp_path / "data"))))
                if e is not None]
    got = rows(p.folder)
    assert [r.dialogue_id for r in got] == [e.dialogue_id for e in expected]  # unit order = file order
    for r, e in zip(got, expected):
        assert r.input_ids.tolist() == e.input_ids.tolist()
        assert r.turn_ids.tolist() == e.turn_ids.tolist() and r.partial.tolist() == e.partial.tolist()
    m = p.manifest
    assert m["counts"]["tokens"] == sum(len(e.input_ids) for e in expected)
    assert m["counts"]["trained_tokens"] == sum(int((e.turn_ids >= 0).sum()) for e in expected)
    assert m["counts"]["partial_turns"] == sum(bool(e.partial.any()) for e in expected) > 0
    assert len(m["shards"]) == 3 and m["max_length"] == 96


def test_cache_hit_and_rebuilds(tmp_path, tiny_model_path, tokenizer):
    paths = chitchat_jsonl(tmp_path / "data", n_files=2, per_file=20)
    c = cfg(tiny_model_path, str(tmp_path / "data"), tmp_path / "prep")
    [first] = prepare(c, tokenizer, tiny_model_path)
    stamp = os.path.getmtime(os.path.join(first.folder, "manifest.json"))
    [again] = prepare(c, tokenizer, tiny_model_path)
    assert again.hit and again.folder == first.folder
    assert os.path.getmtime(os.path.join(first.folder, "manifest.json")) == stamp  # nothing rewritten
    with open(paths[0], "a", encoding="utf-8") as f:  # a changed file: a new key, a rebuild
        f.write(json.dumps(OPENAI[0]) + "\n")
    [changed] = prepare(c, tokenizer, tiny_model_path)
    assert not changed.hit and changed.folder != first.folder
    assert changed.manifest["counts"]["dialogues"] == first.manifest["counts"]["dialogues"] + 1
    import copy

    tok = copy.deepcopy(tokenizer)  # another tokenizer (here: its template) is another key too
    tok.chat_template = tok.chat_template.replace("You are a helpful", "You are a careful")
    [other] = prepare(c, tok, tiny_model_path)
    assert not other.hit and other.folder not in (first.folder, changed.folder)
    longer = cfg(tiny_model_path, str(tmp_path / "data"), tmp_path / "prep", "data.max_length=128")
    assert prepare(longer, tokenizer, tiny_model_path)[0].folder != changed.folder


def test_a_file_edited_while_prepare_reads_it_publishes_nothing(tmp_path, tiny_model_path, tokenizer, monkeypatch):
    """A record appended to a source file after its unit was read: the shards held the first version
    under its key, and the manifest named the second, so the next run prepared again but this one
    trained the mix. Now nothing is published, the error names the file, and the next run prepares
    the new version whole."""
    from resure_ds.data import prepare as prep

    paths = chitchat_jsonl(tmp_path / "data", n_files=2, per_file=20)
    c = cfg(tiny_model_path, str(tmp_path / "data"), tmp_path / "prep")
    real = prep.run_units

    def then_edited(*args, **kwargs):
        real(*args, **kwargs)
        with open(paths[0], "a", encoding="utf-8") as f:
            f.write(json.dumps(OPENAI[0]) + "\n")

    monkeypatch.setattr(prep, "run_units", then_edited)
    with pytest.raises(DataError, match=rf"{re.escape(str(paths[0]))} changed while prepare read it; nothing was "
                                        "published"):
        prepare(c, tokenizer, tiny_model_path)
    assert not list((tmp_path / "prep").glob("*/manifest.json"))
    monkeypatch.setattr(prep, "run_units", real)
    [p] = prepare(c, tokenizer, tiny_model_path)
    assert not p.hit and p.manifest["counts"]["dialogues"] == 41


def test_a_cache_hit_reads_the_tokenizer_from_its_memo_and_any_change_loads_it(tmp_path, tiny_model_path,
                                                                              monkeypatch):
    """The launcher's prepare on a cache hit imports no transformers (the memo gives the key); an
    edited tokenizer file, another template or a damaged memo loads the tokenizer again."""
    import shutil

    from resure_ds.data import tokenizer_memo
    from resure_ds.data.tokenizer_memo import OnDemand

    monkeypatch.setenv("RESURE_CACHE", str(tmp_path / "cache"))
    model = shutil.copytree(tiny_model_path, tmp_path / "model")
    chitchat_jsonl(tmp_path / "data", n_files=1, per_file=10)
    c = cfg(str(model), str(tmp_path / "data"), tmp_path / "prep")
    [first] = prepare(c, OnDemand(str(model)), str(model))
    code = ("import sys; from resure_ds.data.prepare import main; rc = main(sys.argv[1:]); "
            "print('transformers' in sys.modules, rc)")
    args = [f"model.path={model}", f"data.train={tmp_path / 'data'}", f"data.prepared_dir={tmp_path / 'prep'}",
            "data.max_length=96"]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "RESURE_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[-2:] == ["False", "0"], out.stderr[-2000:]
    assert first.folder in out.stdout and "cache hit" in out.stderr
    loads = []
    real = tokenizer_memo.load_tokenizer
    monkeypatch.setattr(tokenizer_memo, "load_tokenizer", lambda *a: loads.append(a) or real(*a))
    assert prepare(c, OnDemand(str(model)), str(model))[0].hit and loads == []  # the memo, no tokenizer
    jinja = model / "chat_template.jinja"  # the template transformers reads first
    assert jinja.exists()
    jinja.write_text(jinja.read_text().replace("You are a helpful", "You are a careful"))
    [edited] = prepare(c, OnDemand(str(model)), str(model))
    assert len(loads) == 1 and not edited.hit and edited.folder != first.folder
    other = OnDemand(str(model), "{{ messages[0]['content'] }}")
    assert other.fingerprints()["template"] != OnDemand(str(model)).fingerprints()["template"] and len(loads) == 2
    for memo in (tmp_path / "cache" / "tokenizers").iterdir():
        memo.write_text("{not json")
    assert OnDemand(str(model)).fingerprints() == edited_fps(model) and len(loads) == 3  # damaged: loaded
    (tmp_path / "ro").write_text("a file where the cache's folder would be")
    monkeypatch.setenv("RESURE_CACHE", str(tmp_path / "ro"))  # a cache that cannot be written
    assert OnDemand(str(model)).fingerprints() == edited_fps(model) and len(loads) == 4


def test_the_memo_key_reads_small_files_whole_and_large_ones_by_size_and_time(tmp_path, monkeypatch):
    from resure_ds.data import tokenizer_memo
    from resure_ds.data.tokenizer_memo import memo_key

    monkeypatch.setattr(tokenizer_memo, "READ_LIMIT", 16)
    (tmp_path / "tokenizer.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    big = tmp_path / "extra.dat"
    big.write_bytes(b"x" * 32)
    first = memo_key(str(tmp_path), None, False)
    (tmp_path / "model.safetensors").write_bytes(b"other weights")  # weights are not the tokenizer's
    assert memo_key(str(tmp_path), None, False) == first
    (tmp_path / "tokenizer.json").write_text('{"a": 2}')  # same size, other bytes
    second = memo_key(str(tmp_path), None, False)
    assert second != first
    os.utime(big, ns=(1, 1))
    assert memo_key(str(tmp_path), None, False) != second
    assert memo_key(str(tmp_path), "{{ x }}", False) != memo_key(str(tmp_path), None, False)
    assert memo_key(str(tmp_path), None, True) is None  # code of its own may run: always loaded
    (tmp_path / "tokenization_custom.py").write_text("")
    assert memo_key(str(tmp_path), None, False) is None
    assert memo_key(str(tmp_path / "absent"), None, False) is None
    (tmp_path / "tokenization_custom.py").unlink()
    (tmp_path / "tokenizer_config.json").write_text('{"fast_tokenizer_files": ["sub/tokenizer.json"]}')
    assert memo_key(str(tmp_path), None, False) is None  # a file outside the top level: always loaded


def test_a_folder_edited_while_the_tokenizer_loads_leaves_no_memo(tmp_path, tiny_model_path, monkeypatch):
    import shutil

    from resure_ds.data import tokenizer_memo

    monkeypatch.setenv("RESURE_CACHE", str(tmp_path / "cache"))
    model = shutil.copytree(tiny_model_path, tmp_path / "model")
    real = tokenizer_memo.load_tokenizer

    def load_then_edit(*a):
        tok = real(*a)
        (model / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
        return tok

    monkeypatch.setattr(tokenizer_memo, "load_tokenizer", load_then_edit)
    tokenizer_memo.OnDemand(str(model)).fingerprints()
    assert not (tmp_path / "cache" / "tokenizers").exists() or not any((tmp_path / "cache" / "tokenizers").iterdir())


def edited_fps(model):
    from resure_ds.data.tokenizer_memo import fingerprints_of
    from resure_ds.models import load_tokenizer

    return fingerprints_of(load_tokenizer(str(model)))


REFUSING = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('must open with a user') }}{% endif %}"
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
OPENS_WITH_ASSISTANT = json.dumps({"messages": [{"role": "assistant", "content": "Hi, I start."},
                                                {"role": "user", "content": "ok"}]})


def test_every_bad_record_is_counted_like_the_reader_and_template_refusals_too(tmp_path, tiny_model_path, tokenizer):
    import copy

    deep = '{"messages": [' + '[' * 100000 + ']' * 100000 + ']}'  # valid JSON, nested past the parser's limit
    raw = [b[0] for b in BAD] + [OPENS_WITH_ASSISTANT, deep]
    path = write_jsonl(tmp_path / "mix.jsonl", OPENAI, raw_lines=raw)
    with open(path, "ab") as f:
        f.write(b'{"messages": [{"role": "user", "content": "\\xff"}]}\n'.replace(b"\\xff", b"\xff"))
        f.write(b'{"messages": [{"role": "user", "content": "a\\udc31"}, {"role": "assistant", "content": "b"}]}\n')
    reader = SkipCounter()
    n_valid = sum(1 for _ in read_dialogues(path, skip_invalid=True, skipped=reader))
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = REFUSING
    c = cfg(tiny_model_path, path, tmp_path / "prep", "data.skip_invalid=true")
    [p] = prepare(c, tok, tiny_model_path)
    counts = p.manifest["counts"]
    assert counts["skipped"] == {**reader, "template_refused": 1}
    assert reader["bad_encoding"] == 1 and reader["malformed_json"] == 2 and reader["bad_text"] == 1
    assert counts["dialogues"] == n_valid - 1 == len(OPENAI)
    assert counts["records"] == len(OPENAI) + len(raw) + 2


def test_template_refusal_is_an_error_at_prepare(tmp_path, tiny_model_path, tokenizer):
    import copy

    path = write_jsonl(tmp_path / "d.jsonl", OPENAI, raw_lines=[OPENS_WITH_ASSISTANT])
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = REFUSING
    with pytest.raises(DataError) as e:
        prepare(cfg(tiny_model_path, path, tmp_path / "prep"), tok, tiny_model_path)
    msg = str(e.value)
    assert "d.jsonl line 3" in msg and "must open with a user" in msg and "data.skip_invalid=true" in msg


def test_empty_and_missing_sources_are_named(tmp_path, tiny_model_path, tokenizer):
    (tmp_path / "empty").mkdir()
    for spec, text in ((str(tmp_path / "nope.jsonl"), "nope.jsonl: no such file or folder"),
                       (str(tmp_path / "empty"), "empty: the folder holds no"),
                       (str(tmp_path / "*.parquet"), "the glob matches no")):
        with pytest.raises(DataError, match=text):
            prepare(cfg(tiny_model_path, spec, tmp_path / "prep"), tokenizer, tiny_model_path)
    good = write_jsonl(tmp_path / "good.jsonl", [{"id": "a", "messages": [{"role": "user", "content": "q"},
                                                                        {"role": "assistant", "content": "a"}]}])
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DataError, match=r"data.prepared_dir=.*a-file is a file; give a folder"):
        prepare(cfg(tiny_model_path, good, tmp_path / "a-file"), tokenizer, tiny_model_path)
    only_bad = write_jsonl(tmp_path / "bad.jsonl", [], raw_lines=[BAD[3][0]])
    with pytest.raises(DataError, match="no trainable dialogue .*no_assistant_turn=1"):
        prepare(cfg(tiny_model_path, only_bad, tmp_path / "prep", "data.skip_invalid=true"), tokenizer,
                tiny_model_path)


def test_sources_files_globs_gzip_parquet_datasets_and_mixtures(tmp_path, tiny_model_path, tokenizer):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"id": f"r{i}", "messages": OPENAI[i % 2]["messages"]} for i in range(6)]
    write_jsonl(tmp_path / "a.jsonl", recs[:2])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in recs[2:4]) + "\n")
    pq.write_table(pa.Table.from_pylist(recs[4:]), tmp_path / "c.parquet")
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "hf"), num_shards=3)
    got = {}
    for name, spec in (("glob", str(tmp_path / "*.*")), ("hf", str(tmp_path / "hf")),
                       ("gz", str(tmp_path / "b.jsonl.gz"))):
        [p] = prepare(cfg(tiny_model_path, spec, tmp_path / "prep"), tokenizer, tiny_model_path)
        got[name] = [r.dialogue_id for r in rows(p.folder)]
        if name == "hf":  # each of the folder's 3 Arrow files streamed as one unit, rows numbered across them
            assert [s["dialogues"] for s in p.manifest["shards"]] == [2, 2, 2]
    assert got["glob"] == got["hf"] == [f"r{i}" for i in range(6)] and got["gz"] == ["r2", "r3"]
    recs[3] = {"id": "r3"}  # no messages: the error names the folder and the row across the files
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "hf-bad"), num_shards=3)
    with pytest.raises(DataError, match=r"hf-bad row 3: "):
        prepare(cfg(tiny_model_path, str(tmp_path / "hf-bad"), tmp_path / "prep"), tokenizer, tiny_model_path)
    mix = [{"path": str(tmp_path / "a.jsonl"), "weight": 3}, {"path": str(tmp_path / "c.parquet"), "name": "pq"}]
    ps = prepare(cfg(tiny_model_path, mix, tmp_path / "prep"), tokenizer, tiny_model_path)
    assert [p.spec.weight for p in ps] == [3.0, 1.0] and [p.spec.label for p in ps][1] == "pq"
    # the same mixture as YAML in a recipe file
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"data:\n  train:\n    - path: {tmp_path / 'a.jsonl'}\n      weight: 3\n"
                      f"    - {{path: {tmp_path / 'c.parquet'}, name: pq}}\n")
    assert load_config(str(recipe)).data.train == mix


def test_large_jsonl_is_split_at_line_ends_with_true_line_numbers(tmp_path, monkeypatch):
    from resure_ds.data import sources

    recs = [{"messages": OPENAI[1]["messages"]} for _ in range(40)]
    path = write_jsonl(tmp_path / "big.jsonl", recs, raw_lines=['{"messages": []}'])
    monkeypatch.setattr(sources, "UNIT_BYTES", 500)
    units = sources.units_of(sources.resolve(sources.SourceSpec(path)))
    assert len(units) > 5 and units[0].start == 0 and units[-1].stop == os.path.getsize(path)
    assert all(a.stop == b.start for a, b in zip(units, units[1:]))
    ids = [d.dialogue_id for d in read_dialogues(path, skip_invalid=True)]
    assert ids == [f"big.jsonl:{i}" for i in range(1, 41)]
    with pytest.raises(DataError, match="big.jsonl line 41: the conversation is empty"):
        list(read_dialogues(path))


def test_several_tasks_share_the_units_and_task_0_publishes(tmp_path, tiny_model_path, tokenizer):
    """Two prepare processes as two nodes would run them (RANK/WORLD_SIZE, launch/prepare.sh)."""
    chitchat_jsonl(tmp_path / "data", n_files=4, per_file=15)
    args = [f"model.path={tiny_model_path}", f"data.train={tmp_path / 'data'}", "data.max_length=96"]
    env = {**os.environ, "WORLD_SIZE": "2", "PYTHON": sys.executable}
    procs = [subprocess.Popen(["bash", os.path.join(ROOT, "launch", "prepare.sh"), *args,
                               f"data.prepared_dir={tmp_path / 'multi'}", "data.prepare_workers=1"],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (1, 0)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    folder = outs[1][0].strip().splitlines()[-1]
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert manifest["tasks"] == 2 and len(manifest["shards"]) == 4
    [single] = prepare(load_config(None, [*args, f"data.prepared_dir={tmp_path / 'one'}"]), tokenizer,
                       tiny_model_path)
    a, b = rows(folder), rows(single.folder)
    assert [r.dialogue_id for r in a] == [r.dialogue_id for r in b] and len(a) == manifest["counts"]["rows"] > 50
    assert all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a, b))


@pytest.mark.slow
def test_a_killed_worker_is_one_clear_error_and_prepare_resumes(tmp_path, tiny_model_path):
    import glob
    import signal
    import time

    import psutil

    chitchat_jsonl(tmp_path / "data", n_files=8, per_file=40)
    cmd = [sys.executable, "-m", "resure_ds.data.prepare", f"model.path={tiny_model_path}",
           f"data.train={tmp_path / 'data'}", f"data.prepared_dir={tmp_path / 'prep'}", "data.prepare_workers=2",
           "data.max_length=96"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not glob.glob(str(tmp_path / "prep" / "*.partial" / "units" / "*.json")) and time.time() < deadline:
        time.sleep(0.05)  # until a first unit is done: the others are in flight
    workers = [c for c in psutil.Process(p.pid).children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]
    assert workers
    os.kill(workers[0].pid, signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "a prepare worker process died" in err and "Traceback" not in err
    done = len(glob.glob(str(tmp_path / "prep" / "*.partial" / "units" / "*.json")))
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"8 unit(s), {8 - done} for this task" in again.stderr
    m = json.load(open(os.path.join(again.stdout.strip().splitlines()[-1], "manifest.json")))
    assert len(m["shards"]) == 8 and m["counts"]["records"] == 320


def test_a_shard_damaged_after_prepare_is_named_before_use(tmp_path, tiny_model_path, tokenizer):
    """A prepared shard truncated, or changed at its size, after it was written: the cache hit names the
    shard and the fix instead of handing it to a loader worker (which once hung a one-rank job)."""
    chitchat_jsonl(tmp_path / "data", n_files=2, per_file=30)
    c = cfg(tiny_model_path, str(tmp_path / "data"), tmp_path / "prep")
    [p] = prepare(c, tokenizer, tiny_model_path)
    shard = os.path.join(p.folder, p.manifest["shards"][1]["file"])
    assert p.manifest["shards"][1]["bytes"] == os.path.getsize(shard)
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:  # same size, one byte flipped
        f.write(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(DataError, match=r"00001.arrow: its SHA-256 differs .*delete .* and prepare again"):
        prepare(c, tokenizer, tiny_model_path)
    assert ensure_prepared(c, tokenizer, tiny_model_path, progress=False, checksums=False)[0].hit  # sizes only
    with open(shard, "wb") as f:
        f.write(data[:len(data) // 2])
    for checksums in (True, False):
        with pytest.raises(DataError, match=rf"00001.arrow: {len(data) // 2} bytes, {len(data)} were written"):
            ensure_prepared(c, tokenizer, tiny_model_path, progress=False, checksums=checksums)
    with pytest.raises(DataError, match="00001.arrow: its SHA-256|00001.arrow: .* bytes"):  # given by its folder
        prepare(cfg(tiny_model_path, p.folder, tmp_path / "prep"), tokenizer, tiny_model_path)
    os.remove(shard)
    with pytest.raises(DataError, match="00001.arrow: a shard of this prepared folder is missing"):
        prepare(c, tokenizer, tiny_model_path)


def test_the_launch_check_hashes_a_shard_again_only_when_it_was_written_since(tmp_path, tiny_model_path, tokenizer):
    """Checksums are incremental (.verified.json): a shard with the size, modification time and inode it
    had when last hashed is not read again (a launch costs a stat per shard); one written since is."""
    chitchat_jsonl(tmp_path / "data", n_files=2, per_file=30)
    c = cfg(tiny_model_path, str(tmp_path / "data"), tmp_path / "prep")
    [p] = prepare(c, tokenizer, tiny_model_path)
    assert prepare(c, tokenizer, tiny_model_path)[0].hit  # hashes both shards, records their stamps
    with open(os.path.join(p.folder, ".verified.json"), encoding="utf-8") as f:
        assert sorted(json.load(f)) == ["00000.arrow", "00001.arrow"]
    shard = os.path.join(p.folder, "00001.arrow")
    st = os.stat(shard)
    with open(shard, "r+b") as f:  # one byte flipped in place, the modification time put back
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # (its change time moved: a user cannot set it)
    stamps = os.path.join(p.folder, ".verified.json")
    with open(stamps, encoding="utf-8") as f:
        seen = json.load(f)
    seen["00001.arrow"][2] = os.stat(shard).st_ctime_ns  # as if the byte had flipped on disk by itself
    with open(stamps, "w", encoding="utf-8") as f:
        json.dump(seen, f)
    assert prepare(c, tokenizer, tiny_model_path)[0].hit  # not read again: the stamp is unchanged
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # written since (here: touched)
    with pytest.raises(DataError, match=r"00001.arrow: its SHA-256 differs"):
        prepare(c, tokenizer, tiny_model_path)
    # a folder restored from a backup with its times (cp -a; on the same disk the inodes can come back
    # the same): the change times are new, so every shard is hashed again
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    backup = str(tmp_path / "backup")
    shutil.copytree(p.folder, backup, copy_function=shutil.copy2)
    shutil.rmtree(p.folder)
    shutil.copytree(backup, p.folder, copy_function=shutil.copy2)
    with pytest.raises(DataError, match=r"00001.arrow: its SHA-256 differs"):
        prepare(c, tokenizer, tiny_model_path)


def test_lone_surrogates_in_any_string_of_a_record_are_found_not_crashed_on(tmp_path, tiny_model_path, tokenizer):
    """Not only contents: an id, a tool call's name, a tool message's name or a tools schema holding a lone
    surrogate is one located error, or a counted skip under data.skip_invalid (it used to stop prepare
    with a pyarrow UnicodeEncodeError traceback, skip_invalid or not)."""
    ok = '{"id": "fine", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
    bad = [
        ('{"id": "a\\udc31", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
         "id"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null, "tool_calls": '
         '[{"type": "function", "function": {"name": "f\\udc31", "arguments": {}}}]}, {"role": "tool", "content": '
         '"1"}, {"role": "assistant", "content": "done"}]}', "message 1 (assistant) tool_calls[0] function name"),
        ('{"tools": [{"type": "function", "function": {"name": "g", "description": "\\udc31"}}], "messages": '
         '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "tools[0] function description"),
    ]
    for i, (line, where) in enumerate(bad):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(ok + "\n" + line + "\n")
        msg = rf"bad{i}.jsonl line 2: {re.escape(where)} holds a lone surrogate '\\udc31'"
        with pytest.raises(DataError, match=msg):
            prepare(cfg(tiny_model_path, str(path), tmp_path / f"p{i}"), tokenizer, tiny_model_path)
        [p] = prepare(cfg(tiny_model_path, str(path), tmp_path / f"q{i}", "data.skip_invalid=true"), tokenizer,
                      tiny_model_path)
        assert p.manifest["counts"]["skipped"] == {"bad_text": 1} and p.manifest["counts"]["dialogues"] == 1


@pytest.mark.parametrize("flag,value", [("--workers", "-3"), ("--workers", "0"), ("--wait", "nan"), ("--wait", "-1")])
def test_prepare_refuses_worker_counts_and_waits_that_mean_nothing(capsys, flag, value):
    from resure_ds.data.prepare import main

    with pytest.raises(SystemExit) as e:  # -3 workers ran one; a NaN wait never timed out
        main([os.path.join(ROOT, "recipes", "default.yaml"), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: must be a finite number > 0, got '{value}'" in err
