"""benchmarks/gpu/parts.py: a file too large for one call to the GPU machine goes in parts and is
joined there, checked; a missing or damaged part is named."""
import os
import subprocess
import sys

import pytest

from benchmarks.gpu import parts
from tests.conftest import ROOT


def test_split_and_join_give_the_same_bytes(tmp_path):
    data = os.urandom(3 * 2 ** 20 + 12345)
    src = tmp_path / "model.gguf"
    src.write_bytes(data)
    names = parts.split(str(src), str(tmp_path / "p"), 2 ** 20)
    assert names == ["part-00", "part-01", "part-02", "part-03"]
    assert all(os.path.getsize(tmp_path / "p" / n) <= 2 ** 20 for n in names)
    assert parts.missing(str(tmp_path / "p")) == []
    out = parts.join(str(tmp_path / "p"), str(tmp_path / "joined"))
    assert open(out, "rb").read() == data


def test_missing_and_damaged_parts_are_named(tmp_path):
    src = tmp_path / "f"
    src.write_bytes(os.urandom(5000))
    parts.split(str(src), str(tmp_path / "p"), 2000)
    os.remove(tmp_path / "p" / "part-01")  # not carried yet
    assert parts.missing(str(tmp_path / "p")) == ["part-01"]
    with pytest.raises(FileNotFoundError, match="parts part-01 of 3 are missing"):
        parts.join(str(tmp_path / "p"), str(tmp_path / "out"))
    parts.split(str(src), str(tmp_path / "p"), 2000)
    with open(tmp_path / "p" / "part-02", "r+b") as f:  # same size, other bytes
        f.write(b"x")
    with pytest.raises(ValueError, match="part-02: SHA-256 differs"):
        parts.join(str(tmp_path / "p"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")  # nothing half-joined is left where a model is looked for
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu", "parts.py"), "join",
                        str(tmp_path / "p"), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode != 0 and "carry that part again" in r.stderr
