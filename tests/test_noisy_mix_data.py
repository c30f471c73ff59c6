import json
import os
from collections import Counter

from benchmarks.noisy_mix.corrupt import KINDS, make_study_data, split_of
from resure_ds.data.records import read_dialogues


def load(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f]


def test_splits_are_stable_and_disjoint(tmp_path):
    a = make_study_data("chitchat", str(tmp_path / "a"), noise=0.3, early=0.5, seed=1)
    b = make_study_data("chitchat", str(tmp_path / "b"), noise=0.3, early=0.5, seed=2)
    assert a["train"] == b["train"] and a["test"] == b["test"]  # hash split, not seed
    ids = {s: {r["id"] for r in load(tmp_path / "a" / f"{s}.jsonl")} for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert all(split_of(i) == "test" for i in ids["test"])
    assert 0.07 < len(ids["test"]) / sum(map(len, ids.values())) < 0.13


def test_corruption_labels_match_the_data(tmp_path):
    out = str(tmp_path / "d")
    counts = make_study_data("chitchat", out, noise=0.3, early=1.0, seed=3)
    clean = {d.dialogue_id: d for d in read_dialogues("chitchat", skip_invalid=True)}
    labels = load(os.path.join(out, "labels.jsonl"))
    assert counts["corrupted"] == len(labels) == round(0.3 * counts["train"])
    assert set(Counter(x["kind"] for x in labels)) == set(KINDS)
    assert all(x["turn"] == 0 for x in labels)  # early=1.0: always the first assistant turn
    train = {r["id"]: r for r in load(os.path.join(out, "train.jsonl"))}
    labelled = {(x["dialogue_id"], x["turn"]) for x in labels}
    changed = set()
    for did, rec in train.items():
        a = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        b = [m["content"] for m in clean[did].messages if m["role"] == "assistant"]
        changed |= {(did, t) for t, (x, y) in enumerate(zip(a, b)) if x != y}
    assert changed == labelled  # every label is a real change, and nothing else changed
    for s in ("val", "test"):  # held-out splits stay clean
        for rec in load(os.path.join(out, f"{s}.jsonl")):
            assert rec["messages"] == clean[rec["id"]].messages


def test_probe_sets_corrupt_only_the_first_reply(tmp_path):
    from benchmarks.noisy_mix.probe import make_probe_data

    out = str(tmp_path / "d")
    make_study_data("chitchat", out, noise=0.0, early=1.0, seed=0)
    test = load(os.path.join(out, "test.jsonl"))[:20]
    pool = [m["content"] for r in load(os.path.join(out, "train.jsonl")) for m in r["messages"]
            if m["role"] == "assistant"]
    paths = make_probe_data(test, pool, str(tmp_path))
    assert set(paths) == {"clean", *KINDS}
    clean = load(paths["clean"])
    assert [r["id"] for r in clean] == [r["id"] for r in test if any(m["role"] == "assistant" for m in r["messages"])]
    for kind in KINDS:
        bad = load(paths[kind])
        assert [r["id"] for r in bad] == [r["id"] for r in clean]
        for g, b in zip(clean, bad):
            first = next(i for i, m in enumerate(g["messages"]) if m["role"] == "assistant")
            assert b["messages"][first]["role"] == "assistant"
            assert b["messages"][first]["content"] != g["messages"][first]["content"]
            assert b["messages"][:first] == g["messages"][:first]  # the context before it is untouched
            assert b["messages"][first + 1:] == g["messages"][first + 1:]  # so are the later turns
    os.makedirs(tmp_path / "again")
    again = make_probe_data(test, pool, str(tmp_path / "again"))
    assert all(load(again[k]) == load(paths[k]) for k in paths)  # deterministic: every run probes the same text


def test_worker_shares_partition_the_plan():
    from benchmarks.noisy_mix.run import PROFILES, plan, run_name, share

    for name, p in PROFILES.items():
        runs = [run_name(r) for r in plan(p)]
        assert len(runs) == len(set(runs))  # every run once
        parts = [[run_name(r) for r in share(plan(p), p, i, 3)] for i in range(3)]
        assert sorted(sum(parts, [])) == sorted(runs) and all(parts)  # disjoint, complete, none idle
        assert plan(p)[0]["method"] == plan(p)[1]["method"] == "sft"  # the pilot's runs come first
