"""The installed `resure-ds` command: help, dispatch, and the launcher behind `train`."""
import os
import subprocess
import sys

from resure_ds.config import markdown_table
from tests.conftest import ROOT

EXE = os.path.join(os.path.dirname(sys.executable), "resure-ds")


def cli(*args, cwd=None):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_help_lists_the_commands_recipes_and_options():
    out = cli("--help")
    assert out.returncode == 0, out.stderr
    for sub in ("resure-ds train", "resure-ds prepare", "resure-ds eval", "resure-ds report"):
        assert sub in out.stdout
    for name in sorted(os.listdir(os.path.join(ROOT, "recipes"))):
        if name.endswith(".yaml"):
            assert f"recipes/{name}" in out.stdout
    assert markdown_table() in out.stdout
    assert cli("train", "--help").stdout == out.stdout


def test_unknown_command_and_no_command_fail_with_usage():
    bad = cli("fit")
    assert bad.returncode == 2 and "unknown command 'fit'" in bad.stderr
    assert cli().returncode == 2


def test_train_runs_the_launcher_with_the_shipped_recipe_from_anywhere(tmp_path):
    """From a folder without recipes/: recipes/default.yaml is the shipped one, and a bad option
    stops in the launcher's check before any rank starts (status 2, one clear line)."""
    out = cli("train", "recipes/default.yaml", "train.max_steps=-1", cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "train.max_steps: must be > 0, got -1" in out.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_plan_reads_a_shipped_recipe_from_anywhere(tmp_path):
    """prepare, score and plan find recipes/x.yaml in the clone as train does (load_config)."""
    out = cli("plan", "recipes/offload.yaml", "train.max_steps=-1", cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no such recipe" not in out.stderr and "train.max_steps: must be > 0, got -1" in out.stderr


def test_report_dispatches_to_the_module(tmp_path):
    out = cli("report", str(tmp_path))
    assert out.returncode != 0 and "not a run folder with a logged step" in out.stderr
