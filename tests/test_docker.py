"""The CPU image, built and run: docker/offline_build.sh makes it on a Debian base built offline
(debootstrap) with wheels from the host, then the embedded default trains a few steps inside it,
without a network, and the quick checks of the suite pass inside it.

Needs a Docker engine and root (debootstrap). Elsewhere it is skipped; RESURE_REQUIRE_DOCKER=1
(CI, whose .ci/run starts the engine) turns the skip into a failure."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.long  # an image build: minutes


def engine_missing() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker engine answers (start dockerd as root)"
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        return "the offline base needs root and debootstrap"
    return None


@pytest.fixture(scope="module")
def image():
    why = engine_missing()
    if why:
        if os.environ.get("RESURE_REQUIRE_DOCKER") == "1":
            pytest.fail(f"RESURE_REQUIRE_DOCKER=1 but {why}")
        pytest.skip(why)
    tag = f"resure-ds:cpu-test-{os.getpid()}"
    out = subprocess.run(["bash", os.path.join(ROOT, "docker", "offline_build.sh"), tag], cwd=ROOT,
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    yield tag
    subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


def docker_run(*args, timeout=900):
    return subprocess.run(["docker", "run", "--rm", "--network", "none", "--shm-size=1g", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_the_image_trains_the_embedded_default_without_a_network(image, tmp_path):
    out = docker_run("-v", f"{tmp_path}:/workspace/resure-ds/runs", image, "recipes/default.yaml",
                     "train.max_steps=2", "checkpoint.every=0")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    # the model and corpus came from the image's cache: prepared at build time, nothing prepared now
    assert "chitchat: ready (cache hit)" in out.stderr
    run = tmp_path / "resure-default"
    with open(run / "metrics.jsonl", encoding="utf-8") as f:
        steps = [json.loads(ln) for ln in f if ln.strip()]
    assert [r["step"] for r in steps] == [1, 2] and all(r["loss"] > 0 for r in steps)
    assert "final loss" in (run / "summary.txt").read_text()
    assert (run / "export" / "config.json").exists()


def test_the_suites_quick_checks_pass_inside_the_image(image):
    out = docker_run("--entrypoint", "python", image, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                     "tests/test_welford.py", "tests/test_config.py", "tests/test_records.py")
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
