"""Sources and prepared folders in an object store, against a real S3-compatible server on loopback
(moto's, started and stopped here: tests/s3_server.py): the same shards as from a local disk, a
published folder fetched once per node and verified, an edited object noticed, an unfinished
publication never read, and each failure of the store one error naming the URL. Training 2 ranks from
the store, killed and resumed: tests/test_faults.py."""
import gzip
import json
import os
import shutil
import subprocess
import sys
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resure_ds.config import load_config
from resure_ds.config.parse import train_specs
from resure_ds.data.prepare import ensure_prepared, prepare_source
from resure_ds.data.reference import published, write_reference
from resure_ds.errors import ConfigError, DataError
from tests.conftest import ROOT
from tests.s3_server import SECRET, listening, s3_store
from tests.test_prepare import chitchat_jsonl


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with s3_store(str(tmp_path_factory.mktemp("moto"))) as st:
        yield st
    assert not listening(st.port)  # nothing left listening


def _fresh_clients():
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a client made for another server's environment


@pytest.fixture
def s3(server, monkeypatch, tmp_path):
    """The store's environment in this process, a new bucket, and this node's cache in tmp_path."""
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RESURE_CACHE", str(tmp_path / "cache"))
    _fresh_clients()
    bucket = f"corpus-{uuid.uuid4().hex[:8]}"
    server.client().create_bucket(Bucket=bucket)
    return server, bucket


@pytest.fixture
def stored(s3, tmp_path):
    """s3, with raw_corpus's files in tmp_path/data and its raw/ folder uploaded to the bucket's raw/."""
    server, bucket = s3
    data = raw_corpus(tmp_path / "data")
    server.upload_folder(str(data / "raw"), bucket, "raw")
    return server, bucket, data


def cfg(model, train, prepared, *extra):
    train = train if isinstance(train, str) else json.dumps(train)
    return load_config(None, [f"model.path={model}", f"data.train={train}", f"data.prepared_dir={prepared}",
                              "data.max_length=96", *extra])


def raw_corpus(folder):
    """Real chitchat dialogues as 3 JSONL files (one nested), a .jsonl.gz and a Parquet file."""
    paths = chitchat_jsonl(folder / "raw", n_files=3, per_file=40)
    with open(paths[0], "rb") as f, gzip.open(folder / "raw" / "extra.jsonl.gz", "wb") as g:
        g.write(f.read())
    with open(paths[1], encoding="utf-8") as f:
        recs = [json.loads(ln) for ln in f]
    (folder / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist([{"id": r["id"] + "-pq", "messages": r["messages"]}
                                         for r in recs]), folder / "pq" / "part.parquet")
    return folder


def shard_sums(p):
    return [s["sha256"] for s in p.manifest["shards"]]


def test_sources_in_the_store_prepare_the_same_shards_as_the_same_files_on_disk(s3, tmp_path, tiny_model_path,
                                                                                  tokenizer):
    server, b = s3
    data = raw_corpus(tmp_path / "data")
    server.upload_folder(str(data), b, "data")
    local = [str(data / "raw"), str(data / "raw" / "nested" / "*.jsonl"), str(data / "pq" / "part.parquet")]
    there = [f"s3://{b}/data/raw/", f"s3://{b}/data/raw/nested/*.jsonl", f"s3://{b}/data/pq/part.parquet"]
    mine = ensure_prepared(cfg(tiny_model_path, local, tmp_path / "prep"), tokenizer, tiny_model_path,
                           workers=1, progress=False)
    theirs = ensure_prepared(cfg(tiny_model_path, there, f"s3://{b}/prepared"), tokenizer, tiny_model_path,
                             workers=2, progress=False)
    for a, c in zip(mine, theirs):
        assert shard_sums(a) == shard_sums(c) and a.manifest["counts"] == c.manifest["counts"]
        assert c.folder.startswith(str(tmp_path / "cache" / "fetched")) and not c.hit
    # the folder source holds the 3 JSONL files and the .jsonl.gz, in the local order
    assert [f[0] for f in theirs[0].manifest["source"]["files"]] == [
        f"s3://{b}/data/raw/extra.jsonl.gz", f"s3://{b}/data/raw/part-0.jsonl", f"s3://{b}/data/raw/part-1.jsonl",
        f"s3://{b}/data/raw/nested/part-2.jsonl"]
    etag = server.client().head_object(Bucket=b, Key="data/raw/part-0.jsonl")["ETag"].strip('"')
    assert theirs[0].manifest["source"]["files"][1][2] == etag  # the store's version, not a local mtime
    keys = server.keys(b, "prepared/")
    name = theirs[0].manifest["name"].rstrip("/").rsplit("/", 1)[-1]
    published_one = [k.split("/", 2)[2] for k in keys if k.startswith(f"prepared/{name}-")]
    assert "manifest.json" in published_one and {"00000.arrow", "units/00000.json"} <= set(published_one)


def test_a_node_fetches_a_published_folder_once_and_checks_it(stored, tmp_path, tiny_model_path, tokenizer, monkeypatch):
    server, b, data = stored
    c = cfg(tiny_model_path, f"s3://{b}/raw", f"s3://{b}/prepared")
    [first] = ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=False)
    shard_reads = lambda: [r for r in server.requests() if r.startswith("GET") and r.endswith(".arrow")]  # noqa: E731
    before = len(shard_reads())
    [again] = ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=False)
    assert again.hit and again.folder == first.folder and len(shard_reads()) == before  # no data read
    # another node (an empty cache): downloads every shard once, checks it, then is a hit too
    monkeypatch.setenv("RESURE_CACHE", str(tmp_path / "node2"))
    [other] = ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=False, checksums=False)
    assert other.hit and len(shard_reads()) == before + len(first.manifest["shards"])
    assert open(os.path.join(other.folder, "manifest.json")).read() == open(
        os.path.join(first.folder, "manifest.json")).read()
    ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=False)
    assert len(shard_reads()) == before + len(first.manifest["shards"])
    # the published folder itself as the source: the same copy
    url = f"s3://{b}/prepared/{os.path.basename(first.folder).rsplit('-', 1)[0]}"
    [named] = ensure_prepared(cfg(tiny_model_path, url, tmp_path / "unused"), tokenizer, tiny_model_path,
                              progress=False)
    assert named.hit and named.folder == other.folder


def test_an_edited_object_is_prepared_again_and_a_changed_shard_is_named(stored, tmp_path, tiny_model_path, tokenizer,
                                                                          monkeypatch):
    server, b, data = stored
    c = cfg(tiny_model_path, f"s3://{b}/raw/part-0.jsonl", f"s3://{b}/prepared")
    [p] = ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=False)
    body = open(data / "raw" / "part-0.jsonl", "rb").read()
    server.client().put_object(Bucket=b, Key="raw/part-0.jsonl", Body=body.replace(b"hi", b"hello"))
    [q] = ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=False)
    assert not q.hit and q.manifest["key"] != p.manifest["key"]  # noticed like an edited file
    # a shard of the published folder changed in the store: a node without a copy refuses it by name
    shard = f"prepared/{os.path.basename(q.folder).rsplit('-', 1)[0]}/00000.arrow"
    blob = server.client().get_object(Bucket=b, Key=shard)["Body"].read()
    server.client().put_object(Bucket=b, Key=shard, Body=blob[:-9] + b"X" * 9)
    monkeypatch.setenv("RESURE_CACHE", str(tmp_path / "node2"))
    with pytest.raises(DataError, match=rf"s3://{b}/{shard}: its SHA-256 differs .* delete s3://{b}/prepared/"):
        ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=False)
    server.client().delete_object(Bucket=b, Key=shard)
    with pytest.raises(DataError, match=rf"s3://{b}/{shard}: a shard of this published folder is missing"):
        ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=False)
    # the object the source names removed: one error naming it
    server.client().delete_object(Bucket=b, Key="raw/part-0.jsonl")
    with pytest.raises(DataError, match=rf"s3://{b}/raw/part-0.jsonl: no such object or folder in the store"):
        ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=False)


def test_an_unfinished_publication_is_never_read_and_the_next_prepare_resumes(stored, tmp_path, tiny_model_path,
                                                                              tokenizer, capsys):
    """Two tasks: task 1 never came, so task 0 gives up waiting; the folder in the store has units but no
    manifest. A consumer does not take it for prepared; the next prepare renders only the missing units."""
    server, b, data = stored
    c = cfg(tiny_model_path, f"s3://{b}/raw", f"s3://{b}/prepared")
    [spec] = train_specs(c.data)
    with pytest.raises(DataError, match="after 1 s, 2 unit.s. are still not published"):
        prepare_source(spec, c, tokenizer, tiny_model_path, 1, task=(0, 2), progress=False, wait_s=1)
    keys = server.keys(b, "prepared/")
    folder = keys[0].split("/")[1]
    assert not any(k.endswith("manifest.json") for k in keys) and any("/units/" in k for k in keys)
    with pytest.raises(DataError, match="no manifest.json: an unfinished publication"):
        ensure_prepared(cfg(tiny_model_path, f"s3://{b}/prepared/{folder}", tmp_path / "x"), tokenizer,
                        tiny_model_path, progress=False)
    # an old failure note of a task of another attempt does not block a prepare that does it all
    server.client().put_object(Bucket=b, Key=f"prepared/{folder}/failed-task5.txt", Body=b"old failure")
    capsys.readouterr()
    [p] = ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=True)
    assert "4 unit(s), 2 for this task" in capsys.readouterr().err  # units 0 and 2 were in the store
    [whole] = ensure_prepared(cfg(tiny_model_path, str(data / "raw"), tmp_path / "local"), tokenizer,
                              tiny_model_path, workers=1, progress=False)
    assert shard_sums(p) == shard_sums(whole)


def test_tasks_split_the_units_and_task_0_publishes(stored, tmp_path, tiny_model_path, tokenizer, monkeypatch):
    server, b, data = stored
    c = cfg(tiny_model_path, f"s3://{b}/raw", f"s3://{b}/prepared")
    [spec] = train_specs(c.data)
    monkeypatch.setenv("RESURE_CACHE", str(tmp_path / "node1"))
    later = prepare_source(spec, c, tokenizer, tiny_model_path, 1, task=(1, 2), progress=False)
    assert later.manifest == {} and not any(k.endswith("manifest.json") for k in server.keys(b, "prepared/"))
    monkeypatch.setenv("RESURE_CACHE", str(tmp_path / "node0"))
    p = prepare_source(spec, c, tokenizer, tiny_model_path, 1, task=(0, 2), progress=False, wait_s=30)
    assert p.manifest["tasks"] == 2 and len(p.manifest["shards"]) == 4
    [whole] = ensure_prepared(cfg(tiny_model_path, str(data / "raw"), tmp_path / "local"), tokenizer,
                              tiny_model_path, workers=1, progress=False)
    assert shard_sums(p) == shard_sums(whole)


def test_reference_losses_scored_on_one_node_reach_the_others(stored, tmp_path, tiny_model_path, tokenizer,
                                                               monkeypatch):
    import numpy as np

    server, b, data = stored
    c = cfg(tiny_model_path, f"s3://{b}/raw/part-1.jsonl", f"s3://{b}/prepared")
    [p] = ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=False)
    rows = p.manifest["counts"]["rows"]
    write_reference(os.path.join(p.folder, "reference-abc"), [np.full(2, 1.5, np.float32)] * rows, {"model": "m"})
    assert any(k.endswith("reference-abc/reference.json") for k in server.keys(b, "prepared/"))
    monkeypatch.setenv("RESURE_CACHE", str(tmp_path / "node2"))
    [q] = ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=False)
    assert published(os.path.join(q.folder, "reference-abc"))
    assert np.load(os.path.join(q.folder, "reference-abc", "turn_loss.npy")).tolist() == [1.5] * 2 * rows


def test_each_failure_of_the_store_is_one_error_naming_the_url(s3, tmp_path, tiny_model_path, tokenizer):
    server, b = s3
    with pytest.raises(DataError, match=r"s3://no-such-bucket-here/x.jsonl: no such object or folder"):
        ensure_prepared(cfg(tiny_model_path, "s3://no-such-bucket-here/x.jsonl", tmp_path / "p"), tokenizer,
                        tiny_model_path, progress=False)
    with pytest.raises(DataError, match=rf"s3://{b}/raw/\*.jsonl: the glob matches no"):
        ensure_prepared(cfg(tiny_model_path, f"s3://{b}/raw/*.jsonl", tmp_path / "p"), tokenizer, tiny_model_path,
                        progress=False)
    with pytest.raises(DataError, match=r"gs://bucket/x.jsonl: reading gs:// needs the gcsfs package"):
        ensure_prepared(cfg(tiny_model_path, "gs://bucket/x.jsonl", tmp_path / "p"), tokenizer, tiny_model_path,
                        progress=False)
    with pytest.raises(ConfigError, match=r"data.train: s3:// URL with credentials"):
        cfg(tiny_model_path, "s3://AKIA:secret@bucket/x.jsonl", tmp_path / "p")
    with pytest.raises(ConfigError, match=r"data.prepared_dir: https:// URL with credentials or a \?query"):
        cfg(tiny_model_path, "chitchat", "https://h/p?X-Amz-Signature=abc")


def test_bad_credentials_and_a_dropped_connection_are_one_line_from_the_command(tmp_path, tiny_model_path):
    """Through the prepare command: status 2 and one line naming the URL, never the secret."""
    (tmp_path / "raw").mkdir()
    chitchat_jsonl(tmp_path / "raw", n_files=2, per_file=10)
    cmd = [sys.executable, "-m", "resure_ds.data.prepare", f"model.path={tiny_model_path}", "data.max_length=96",
           "data.prepared_dir=s3://corpus/prepared"]
    with s3_store(str(tmp_path), auth=True) as st:
        user = st.with_user()
        import boto3

        c = boto3.client("s3", endpoint_url=st.url, aws_access_key_id=user["AWS_ACCESS_KEY_ID"],
                         aws_secret_access_key=user["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        c.create_bucket(Bucket="corpus")
        c.upload_file(str(tmp_path / "raw" / "part-0.jsonl"), "corpus", "raw/part-0.jsonl")
        env = {**os.environ, **user, "RESURE_CACHE": str(tmp_path / "cache"), "AWS_SECRET_ACCESS_KEY": SECRET}
        bad = subprocess.run([*cmd, "data.train=s3://corpus/raw/part-0.jsonl"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2, bad.stderr[-3000:]
        [line] = [ln for ln in bad.stderr.splitlines() if ln.startswith("[resure_ds] error")]
        assert "s3://corpus/raw/part-0.jsonl: access denied" in line and "AWS_ACCESS_KEY_ID" in line
        assert SECRET not in bad.stdout + bad.stderr and "Traceback" not in bad.stderr
        good = subprocess.run([*cmd, "data.train=s3://corpus/raw/part-0.jsonl"], cwd=ROOT,
                              env={**env, **user}, capture_output=True, text=True, timeout=300)
        assert good.returncode == 0, good.stderr[-3000:]
        st.proc.kill()
        st.proc.wait()
        gone = subprocess.run([*cmd, "data.train=s3://corpus/raw/"], cwd=ROOT, env={**env, **user},
                              capture_output=True, text=True, timeout=300)
    assert gone.returncode == 2, gone.stderr[-3000:]
    [line] = [ln for ln in gone.stderr.splitlines() if ln.startswith("[resure_ds] error")]
    assert "s3://corpus/raw: the store failed while" in line and "is the endpoint reachable" in line
    shutil.rmtree(tmp_path / "cache")


def test_a_manifest_edited_in_the_store_is_refused_before_anything_is_written(stored, tmp_path, tiny_model_path,
                                                                               tokenizer, monkeypatch):
    """A shard named ../x or /x, a manifest that is not an object, or one without its shards or counts:
    one error naming the manifest; no file is written (or removed) outside the node's copy."""
    server, b, data = stored
    c = cfg(tiny_model_path, f"s3://{b}/raw/part-1.jsonl", f"s3://{b}/prepared")
    [p] = ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=False)
    key = f"prepared/{os.path.basename(p.folder).rsplit('-', 1)[0]}/manifest.json"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    outside = "../" * 12 + str(victim).lstrip("/")
    server.client().put_object(Bucket=b, Key=f"prepared/x/{outside}", Body=b"overwritten")
    good = json.loads(server.client().get_object(Bucket=b, Key=key)["Body"].read())
    for bad in ({**good, "shards": [dict(good["shards"][0], file=outside)]},
                {**good, "shards": [dict(good["shards"][0], file=str(victim))]},
                [good], {k: v for k, v in good.items() if k != "counts"}, {**good, "counts": {}},
                {k: v for k, v in good.items() if k != "source"}, {**good, "shards": []},
                {**good, "counts": {**good["counts"], "dialogues": "12"}}):
        server.client().put_object(Bucket=b, Key=key, Body=json.dumps(bad).encode())
        monkeypatch.setenv("RESURE_CACHE", str(tmp_path / f"node-{uuid.uuid4().hex[:6]}"))
        with pytest.raises(DataError, match=rf"s3://{b}/{key}: (damaged|not a resure-ds prepared folder)"):
            ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=False)
        assert victim.read_text() == "keep me\n"
    server.client().put_object(Bucket=b, Key=key, Body=json.dumps(good)[:200].encode())  # truncated
    with pytest.raises(DataError, match=rf"s3://{b}/prepared/.*: no readable manifest.json"):
        ensure_prepared(cfg(tiny_model_path, f"s3://{b}/{key[:-len('/manifest.json')]}", tmp_path / "p"), tokenizer,
                        tiny_model_path, progress=False)


def test_a_node_waiting_for_units_takes_the_manifest_another_node_published(stored, tmp_path, tiny_model_path,
                                                                            tokenizer, monkeypatch):
    """Node A (task 0 of 2) has uploaded its units and waits for task 1's; node B, launched on its own
    (one task), renders only the two units missing and publishes: A ends with the one publication in
    the store instead of waiting out its deadline."""
    import threading

    server, b, data = stored
    c = cfg(tiny_model_path, f"s3://{b}/raw", f"s3://{b}/prepared")
    [spec] = train_specs(c.data)
    monkeypatch.setenv("RESURE_CACHE", str(tmp_path / "nodeA"))
    got = {}
    a = threading.Thread(target=lambda: got.update(p=prepare_source(spec, c, tokenizer, tiny_model_path, 1,
                                                                    task=(0, 2), progress=False, wait_s=120)))
    a.start()
    while sum("/units/" in k for k in server.keys(b, "prepared/")) < 2:
        assert a.is_alive()
        a.join(0.2)
    cmd = [sys.executable, "-m", "resure_ds.data.prepare", f"model.path={tiny_model_path}", "data.max_length=96",
           f"data.train=s3://{b}/raw", f"data.prepared_dir=s3://{b}/prepared"]
    other = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "RESURE_CACHE": str(tmp_path / "nodeB")},
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 0, other.stderr[-2000:]
    assert "4 unit(s), 2 for this task" in other.stderr  # A's two were in the store
    a.join(120)  # A ends as soon as all four units are in the store (or B's manifest is), not at 120 s
    assert not a.is_alive() and len(got["p"].manifest["shards"]) == 4
    [mkey] = [k for k in server.keys(b, "prepared/") if k.endswith("manifest.json")]
    there = json.loads(server.client().get_object(Bucket=b, Key=mkey)["Body"].read())
    assert there["shards"] == got["p"].manifest["shards"]  # one publication, whoever wrote it


def test_where_and_how_a_url_is_written(stored, tmp_path, tiny_model_path, tokenizer, monkeypatch):
    server, b, data = stored
    # prepared_dir inside the source: refused before anything is written there (in the store and on disk)
    with pytest.raises(DataError, match=rf"data.prepared_dir=s3://{b}/raw/prepared lies inside the source"):
        ensure_prepared(cfg(tiny_model_path, f"s3://{b}/raw/", f"s3://{b}/raw/prepared"), tokenizer, tiny_model_path,
                        progress=False)
    with pytest.raises(DataError, match="lies inside the source"):
        ensure_prepared(cfg(tiny_model_path, str(data / "raw"), data / "raw"), tokenizer, tiny_model_path,
                        progress=False)
    with pytest.raises(DataError, match="lies inside the source"):  # a glob that reaches .json files below
        ensure_prepared(cfg(tiny_model_path, str(data / "raw" / "**" / "*.json*"), data / "raw" / "prepared"),
                        tokenizer, tiny_model_path, progress=False)
    [g] = ensure_prepared(cfg(tiny_model_path, str(data / "raw" / "**" / "*.jsonl"), data / "raw" / "prep-ok"),
                          tokenizer, tiny_model_path, progress=False)  # can never match what prepare writes
    assert g.folder.startswith(str(data / "raw" / "prep-ok"))
    shutil.rmtree(data / "raw" / "prep-ok")
    (data / "evalset").mkdir()
    shutil.copy(data / "raw" / "part-0.jsonl", data / "evalset" / "part-0.jsonl")
    with pytest.raises(DataError, match="lies inside the source .*evalset"):  # before the training source is written
        ensure_prepared(cfg(tiny_model_path, str(data / "raw" / "part-1.jsonl"), data / "evalset" / "prep",
                            f"data.eval={data / 'evalset'}"), tokenizer, tiny_model_path, progress=False)
    assert not os.path.exists(data / "evalset" / "prep")
    assert server.keys(b, "raw/prepared") == [] and not os.path.exists(data / "raw" / "prepared")
    # a one-level glob never reads what prepare writes below its folder (test_prepare's data/*.* with data/prep)
    # repeated slashes collapse; file:// is a local path
    [p] = ensure_prepared(cfg(tiny_model_path, f"s3://{b}//raw//part-0.jsonl", f"s3://{b}//prep"), tokenizer,
                          tiny_model_path, progress=False)
    assert any(k.startswith("prep/") for k in server.keys(b)) and not any(k.startswith("/") for k in server.keys(b))
    [q] = ensure_prepared(cfg(tiny_model_path, f"file://{data}/raw/part-0.jsonl", f"file://{tmp_path}/fprep"),
                          tokenizer, tiny_model_path, progress=False)
    assert q.folder.startswith(str(tmp_path / "fprep")) and shard_sums(q) == shard_sums(p)
    # an object wins over a "folder" of the same name; a key with # keeps it in what is recorded
    body = open(data / "raw" / "part-0.jsonl", "rb").read()
    server.client().put_object(Bucket=b, Key="dup.jsonl", Body=body)
    server.client().put_object(Bucket=b, Key="dup.jsonl/x.jsonl", Body=body[:body.index(b"\n") + 1])
    server.client().put_object(Bucket=b, Key="h/a#1.jsonl", Body=body)
    [d, h] = ensure_prepared(cfg(tiny_model_path, [f"s3://{b}/dup.jsonl", f"s3://{b}/h/a#1.jsonl"],
                                 f"s3://{b}/prepared"), tokenizer, tiny_model_path, progress=False)
    assert d.manifest["counts"]["dialogues"] == p.manifest["counts"]["dialogues"]
    assert h.manifest["source"]["files"][0][0] == f"s3://{b}/h/a#1.jsonl"
    # Azure's container@account is not a credential
    cfg(tiny_model_path, "abfs://container@account.dfs.core.windows.net/x.jsonl", tmp_path / "p")
    with pytest.raises(ConfigError, match=r"A query is not read"):  # a version id would be taken for a glob
        cfg(tiny_model_path, f"s3://{b}/x.jsonl?versionId=3", tmp_path / "p")


def test_other_readers_follow_a_published_folder_and_bad_bytes_are_not_the_store(stored, tmp_path, tiny_model_path,
                                                                                tokenizer):
    from resure_ds.data.records import read_dialogues
    from resure_ds.plan import steps_per_epoch

    server, b, data = stored
    c = cfg(tiny_model_path, f"s3://{b}/raw/part-0.jsonl", f"s3://{b}/prepared")
    [p] = ensure_prepared(c, tokenizer, tiny_model_path, progress=False)
    url = f"s3://{b}/prepared/{os.path.basename(p.folder).rsplit('-', 1)[0]}"
    # the report's texts and --filter read the raw source a published folder names
    assert [d.dialogue_id for d in read_dialogues(url)] == [d.dialogue_id for d in read_dialogues(
        str(data / "raw" / "part-0.jsonl"))]
    assert steps_per_epoch(c, 1000) == f"about {p.manifest['counts']['tokens'] / 1000:,.0f} " \
        f"({p.manifest['counts']['tokens']:,} prepared tokens; packed rows)"
    server.client().put_object(Bucket=b, Key="bad.jsonl.gz", Body=b"not gzip at all\n")
    with pytest.raises(DataError, match=rf"s3://{b}/bad.jsonl.gz: not a whole gzip file"):
        ensure_prepared(cfg(tiny_model_path, f"s3://{b}/bad.jsonl.gz", tmp_path / "p"), tokenizer, tiny_model_path,
                        progress=False)
    blob = gzip.compress(open(data / "raw" / "part-0.jsonl", "rb").read())
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[:len(blob) // 2])  # on disk too (it was a traceback)
    with pytest.raises(DataError, match=r"cut.jsonl.gz: not a whole gzip file"):
        ensure_prepared(cfg(tiny_model_path, str(tmp_path / "cut.jsonl.gz"), tmp_path / "p"), tokenizer,
                        tiny_model_path, progress=False)
    with pytest.raises(DataError, match=r"^ftp://nohost.invalid/x.jsonl: the store failed while connecting"):
        ensure_prepared(cfg(tiny_model_path, "ftp://nohost.invalid/x.jsonl", tmp_path / "p"), tokenizer,
                        tiny_model_path, progress=False)


def test_a_store_folder_reads_what_the_same_folder_on_disk_reads(s3, tmp_path, tiny_model_path, tokenizer):
    """A file whose name starts with '.' was dropped from a folder in the store (not on disk): 40
    dialogues lost, uncounted. Hidden folders are skipped in both; a key with a '..' part is refused."""
    server, b = s3
    folder = tmp_path / "hid"
    first, second = chitchat_jsonl(folder, n_files=2, per_file=20)  # the second in nested/
    os.rename(first, folder / ".part-0.jsonl")
    (folder / ".cache").mkdir()
    shutil.copy(second, folder / ".cache" / "copy.jsonl")  # a hidden folder: skipped by both
    server.upload_folder(str(folder), b, "hid")
    [disk] = ensure_prepared(cfg(tiny_model_path, str(folder), tmp_path / "prep"), tokenizer, tiny_model_path,
                             progress=False)
    [there] = ensure_prepared(cfg(tiny_model_path, f"s3://{b}/hid/", f"s3://{b}/prepared"), tokenizer,
                              tiny_model_path, progress=False)
    assert there.manifest["counts"] == disk.manifest["counts"] and disk.manifest["counts"]["dialogues"] == 40
    server.client().put_object(Bucket=b, Key="dots/../x.jsonl", Body=open(second, "rb").read())
    with pytest.raises(DataError, match=r"dots/\.\./x\.jsonl: a key with a '\.' or '\.\.' part"):
        ensure_prepared(cfg(tiny_model_path, f"s3://{b}/dots/", f"s3://{b}/prepared"), tokenizer, tiny_model_path,
                        progress=False)


def test_a_scheme_is_one_store_however_it_is_written(stored, tmp_path, tiny_model_path, tokenizer):
    """s3a:// is s3fs's other name for s3://: a prepared_dir written s3:// inside a source written s3a://
    got past the check and wrote into the raw folder; S3:// read as no backend at all."""
    server, b, data = stored
    with pytest.raises(DataError, match="lies inside the source"):
        ensure_prepared(cfg(tiny_model_path, f"s3a://{b}/raw/", f"s3://{b}/raw/prep"), tokenizer, tiny_model_path,
                        progress=False)
    assert server.keys(b, "raw/prep") == []
    [p] = ensure_prepared(cfg(tiny_model_path, f"S3://{b}/raw/part-0.jsonl", f"s3://{b}/prepared"), tokenizer,
                          tiny_model_path, progress=False)
    assert p.manifest["counts"]["dialogues"] == 40


def test_the_local_cache_full_or_read_only_is_not_blamed_on_the_store(s3, monkeypatch):
    """The fetched copies live under RESURE_CACHE: a full disk or a read-only cache named the store
    ("is the endpoint reachable?"). An unknown AWS profile is a credentials error, not a connection's."""
    import errno

    from resure_ds.data import remote

    server, b = s3
    for code, what in ((errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")):
        with pytest.raises(DataError, match=f"{what} on this machine .*RESURE_CACHE .* needs room and must be writable"):
            with remote.store_errors(f"s3://{b}/x.arrow", "downloading"):
                raise OSError(code, os.strerror(code), os.path.join(os.environ["RESURE_CACHE"], "fetched", "x.arrow"))
    with pytest.raises(DataError, match=r"a local file is missing on this machine \(relcache/x.arrow\).*RESURE_CACHE"):
        monkeypatch.setenv("RESURE_CACHE", "relcache")  # relative, as a user may set it
        with remote.store_errors(f"s3://{b}/x.arrow", "uploading"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "relcache/x.arrow")
    with pytest.raises(DataError, match=r"\(/var/run/token\).*this machine's file, not the store's"):
        with remote.store_errors(f"s3://{b}/x.arrow", "connecting"):  # e.g. AWS_WEB_IDENTITY_TOKEN_FILE
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/var/run/token")
    monkeypatch.setenv("AWS_PROFILE", "nosuch")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    _fresh_clients()
    with pytest.raises(DataError, match=r"refused the credentials .*ProfileNotFound"):
        remote.exists(f"s3://{b}/x.jsonl")


def test_a_staged_shard_damaged_before_its_upload_is_rendered_again(stored, tmp_path, tiny_model_path, tokenizer,
                                                                    monkeypatch):
    """A prepare that rendered every unit but uploaded only the first (the store went away): its staged
    shards wait in the cache. One was damaged meanwhile: it was uploaded as it was and then refused at
    every fetch ("changed or damaged in the store"); now it is rendered again, and the publication is
    the same as a local prepare's."""
    from resure_ds.data import publish

    server, b, data = stored
    c = cfg(tiny_model_path, f"s3://{b}/raw", f"s3://{b}/prepared")
    real = publish.upload_unit
    calls = []

    def store_gone_after_one(url, stage, i, record):
        calls.append(i)
        if len(calls) > 1:
            raise DataError("the store failed while uploading (simulated)")
        real(url, stage, i, record)

    monkeypatch.setattr(publish, "upload_unit", store_gone_after_one)
    with pytest.raises(DataError, match="simulated"):
        ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=False)
    monkeypatch.setattr(publish, "upload_unit", real)
    staged = sorted((tmp_path / "cache" / "fetched").glob("*.partial/0000[1-9].arrow"))
    assert staged, list((tmp_path / "cache" / "fetched").iterdir())
    raw = bytearray(staged[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    staged[0].write_bytes(bytes(raw))
    [p] = ensure_prepared(c, tokenizer, tiny_model_path, workers=1, progress=False)
    [whole] = ensure_prepared(cfg(tiny_model_path, str(data / "raw"), tmp_path / "local"), tokenizer,
                              tiny_model_path, workers=1, progress=False)
    assert shard_sums(p) == shard_sums(whole)


def test_an_object_replaced_while_prepare_reads_it_publishes_nothing(stored, tmp_path, tiny_model_path, tokenizer,
                                                                      monkeypatch):
    """A folder of Parquet objects, one replaced after its unit was read: the fingerprint at the end came
    from the listing cached at the start (only JSONL sources listed again), so the change went unseen."""
    from resure_ds.data import prepare as prep

    server, b, data = stored
    server.upload_folder(str(data / "pq"), b, "pq")
    c = cfg(tiny_model_path, f"s3://{b}/pq/", f"s3://{b}/prepared")
    real = prep.run_units

    def then_replaced(*args, **kwargs):
        real(*args, **kwargs)
        table = pq.read_table(data / "pq" / "part.parquet").slice(0, 10)
        pq.write_table(table, tmp_path / "short.parquet")
        server.client().put_object(Bucket=b, Key="pq/part.parquet", Body=(tmp_path / "short.parquet").read_bytes())

    monkeypatch.setattr(prep, "run_units", then_replaced)
    with pytest.raises(DataError, match=rf"s3://{b}/pq/part.parquet changed while prepare read it; nothing was published"):
        ensure_prepared(c, tokenizer, tiny_model_path, progress=False)
    assert not [k for k in server.keys(b, "prepared/") if k.endswith("manifest.json")]
