"""Shared fixtures: the real embedded tokenizer/model and a tiny model built from its config."""
from __future__ import annotations

import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from resure_ds.models import EMBEDDED, resolve_model_path

    return resolve_model_path(EMBEDDED)


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, smollm2_path) -> str:
    """A 2-layer Llama with SmolLM2's tokenizer and template: real code paths, seconds per step."""
    from resure_ds.testing import random_llama

    out = str(tmp_path_factory.mktemp("tiny-llama"))
    random_llama(smollm2_path, out)
    return out


@pytest.fixture(scope="session")
def straight(tmp_path_factory, tiny_model_path) -> str:
    """The reference run of the end-to-end tests (tests/e2e_common.COMMON on 2 ranks, uninterrupted, a
    loader worker per rank): made once per session, compared against by test_e2e.py and test_faults.py."""
    from tests.e2e_common import COMMON, launch

    out = str(tmp_path_factory.mktemp("runs"))
    # every tracker (tests/test_e2e.py reads each back); wandb offline, MLflow in the run folder
    launch("train.sh", ["recipes/default.yaml", f"model.path={tiny_model_path}", *COMMON,
                        "output.report_to=[tensorboard,wandb,mlflow]", f"output.dir={out}", "output.name=straight",
                        "output.plot=true", "output.report=true", "data.num_workers=1"],
           extra_env={"WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": ""})
    return os.path.join(out, "straight")
