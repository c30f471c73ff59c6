"""Reliability, end to end on one rank (the world size that used to hang): a run that stops learning
stops itself, and a failure in a loader worker ends the job with the error (docs/operating.md)."""
import os

import pytest

from tests.e2e_common import COMMON, launch

pytestmark = pytest.mark.slow
ONE = {"NUM_PROCS": "1"}


def one_rank(args, tmp_path, timeout=300):
    """The recipe's rank process alone (what the launcher starts; no prepare step before it)."""
    import socket
    import subprocess

    from tests.e2e_common import env

    s = socket.socket()
    s.bind(("", 0))
    port = s.getsockname()[1]
    s.close()
    e = {**env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return subprocess.run(["bash", "launch/train.sh", f"output.dir={tmp_path}", *args], cwd=os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))), env=e, capture_output=True, text=True, timeout=timeout)


def test_a_diverged_run_stops_with_an_error_and_exports_nothing(tmp_path, tiny_model_path):
    out = one_rank([f"model.path={tiny_model_path}", *COMMON, "train.lr=1e9", "train.max_steps=12",
                    "data.eval=null", "eval.every=0", "output.name=diverged"], tmp_path, timeout=600)
    assert out.returncode != 0, out.stdout[-2000:]
    assert "the run diverged: 3 consecutive optimizer steps" in out.stderr, out.stderr[-3000:]
    assert "Lower train.lr (now 1000000000.0)" in out.stderr and "Traceback" not in out.stderr
    run = tmp_path / "diverged"
    assert not (run / "export").exists() and not (run / "summary.txt").exists()


def test_one_rank_ends_with_the_error_of_a_loader_worker(tmp_path, tiny_model_path):
    """A shard damaged after prepare at its own size (ranks check sizes; the prepare step, skipped here,
    checks SHA-256 sums) fails inside a loader worker: the one rank prints the error and exits, instead
    of waiting forever on the worker."""
    import shutil

    out = launch("prepare.sh", [f"model.path={tiny_model_path}", *COMMON], extra_env=ONE, timeout=300)
    folder = tmp_path / "prepared"
    shutil.copytree(out.stdout.split()[-1], folder)
    for shard in folder.glob("*.arrow"):  # Arrow's closing magic bytes gone: not an Arrow file, same size
        data = shard.read_bytes()
        shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    out = one_rank([f"model.path={tiny_model_path}", *COMMON, f"data.train={folder}", "data.eval=null",
                    "eval.every=0", "data.num_workers=1", "train.max_steps=40"], tmp_path)
    assert out.returncode == 1 and "Not an Arrow file" in out.stderr, out.stderr[-3000:]
    assert "[resure_ds] error: the run failed" in out.stderr


def test_one_rank_refuses_a_held_out_split_that_empties_a_source(tmp_path, tiny_model_path):
    import json

    from resure_ds.data.holdout import held_out

    ids = [f"d{i}" for i in range(200)]
    held = held_out(ids, 0.3)
    small = [i for i, h in zip(ids, held) if h][:2]  # a source whose every dialogue the split holds out
    big = [i for i, h in zip(ids, held) if not h][:20]
    for name, chosen in (("big", big), ("small", small)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in chosen:
                f.write(json.dumps({"id": i, "messages": [{"role": "user", "content": f"hi {i}"},
                                                          {"role": "assistant", "content": f"hello {i}"}]}) + "\n")
    train = json.dumps([{"path": str(tmp_path / "big.jsonl"), "name": "big"},
                        {"path": str(tmp_path / "small.jsonl"), "name": "small"}])
    out = one_rank([f"model.path={tiny_model_path}", *COMMON, f"data.train={train}", "data.eval=0.3"], tmp_path)
    assert out.returncode == 2 and "the held-out split takes every dialogue of ['small']" in out.stderr, \
        out.stderr[-3000:]


def test_resume_refuses_another_model_seed_or_packing_with_the_difference(tmp_path, tiny_model_path):
    """A checkpoint records what it was trained on; resuming with another seed or pack_window (which
    silently repeated and skipped data) or a model of another shape (a DeepSpeed traceback) is refused."""
    from resure_ds.testing import TINY, random_llama

    base = [*COMMON, "data.eval=null", "eval.every=0", "checkpoint.every=1"]
    out = one_rank([f"model.path={tiny_model_path}", *base, "train.stop_after=2"], tmp_path)
    assert out.returncode == 75, out.stderr[-3000:]
    other = str(tmp_path / "wider")
    random_llama(tiny_model_path, other, shape=(128, *TINY[1:3], 4, 2, 32))
    for args, diff in (([f"model.path={tiny_model_path}", "train.seed=7"], "train.seed: checkpoint 1234, this run 7"),
                       ([f"model.path={tiny_model_path}", "data.pack_window=64"], "data.pack_window: checkpoint"),
                       ([f"model.path={other}"], "model: checkpoint {")):
        out = one_rank([*base, *args], tmp_path)
        assert out.returncode == 2 and diff in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert "checkpoint.resume=none" in out.stderr


def test_unwritable_output_and_missing_model_are_one_clear_error(tmp_path, tiny_model_path):
    (tmp_path / "a-file").write_text("x")
    out = one_rank([f"model.path={tiny_model_path}", *COMMON, f"output.dir={tmp_path / 'a-file'}"], tmp_path)
    assert out.returncode == 2 and "it must be writable and have space" in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    out = launch("train.sh", [f"model.path={tmp_path / 'no-model'}", *COMMON], extra_env=ONE, status=None)
    assert out.returncode == 2 and "no-model: no such folder" in out.stderr and "sentencepiece" not in out.stderr
