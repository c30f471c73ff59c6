import glob
import os

import pytest

from resure_ds.config import Config, ConfigError, load_config
from tests.conftest import ROOT

RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))


def test_there_are_recipes():
    assert any(p.endswith("default.yaml") for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_loads_and_opens_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    rel = os.path.relpath(path, ROOT)
    assert first.startswith("# ") and rel in first, f"{rel} must open with the command that runs it"


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.lr=3e-5", "resure.weight_fn=sigmoid", "model.chat_template=null",
                             "stats.decay=0.99", "data.train=x.jsonl"])
    assert cfg.train.lr == 3e-5 and cfg.resure.weight_fn == "sigmoid" and cfg.stats.decay == 0.99
    assert cfg.data.train == "x.jsonl" and cfg.model.chat_template is None
    assert load_config().train.zero_stage == 3


def test_all_problems_in_one_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: -1\n  mehtod: sft\nresure:\n  weight_fn: cubic\n  tau: fast\nstats:\n  decay: 1.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p), ["data.max_length=0"])
    msg = str(e.value)
    for part in ("bad.yaml", "train.mehtod: unknown key", "resure.weight_fn: must be one of",
                 "resure.tau: must be float"):
        assert part in msg, part
    # value checks run once types are right
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lr=-1", "stats.decay=1.5", "data.max_length=0"])
    msg = str(e.value)
    assert "3 config problem(s)" in msg
    assert "train.lr: must be > 0" in msg and "stats.decay: must be in (0, 1]" in msg


def test_bad_override_syntax_and_missing_recipe():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="no such recipe"):
        load_config("nope.yaml")


def test_a_recipe_that_is_a_folder_or_not_text_is_one_config_error(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "bin.yaml").write_bytes(b"model:\n  path: \xff\xfe\n")
    for name in ("dir.yaml", "bin.yaml"):
        with pytest.raises(ConfigError, match=f"{name}: cannot read the recipe .*a recipe is a YAML text file"):
            load_config(str(tmp_path / name))


def test_the_shipped_recipes_and_their_ds_config_load_from_any_directory(tmp_path, monkeypatch):
    """recipes/offload.yaml names recipes/ds_offload.json relative to the clone: from a folder without
    recipes/, both are the clone's files; a DeepSpeed JSON found nowhere is one config problem."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config("recipes/offload.yaml")
    assert cfg.train.ds_config == os.path.join(ROOT, "recipes", "ds_offload.json")
    with pytest.raises(ConfigError, match=r"train.ds_config: no such file nope/ds.json \(a DeepSpeed JSON"):
        load_config("recipes/offload.yaml", ["train.ds_config=nope/ds.json"])
    os.makedirs("recipes")
    with open("recipes/ds_offload.json", "w", encoding="utf-8") as f:
        f.write("{}")
    assert load_config("recipes/offload.yaml").train.ds_config == "recipes/ds_offload.json"  # the folder's own first
    for text, problem in (("{\"zero_optimization\": ", "is not a readable JSON file"), ("[1]", "must hold a JSON object")):
        with open("recipes/ds_offload.json", "w", encoding="utf-8") as f:
            f.write(text)
        with pytest.raises(ConfigError, match=f"train.ds_config: recipes/ds_offload.json {problem}"):
            load_config("recipes/offload.yaml")


def test_the_docs_document_every_option_with_its_default():
    from resure_ds.config import markdown_table

    with open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8") as f:
        options = f.read()
    assert markdown_table() in options, "docs/configuration.md is stale: paste `python -m resure_ds.config`"
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "docs/configuration.md" in readme and "bash launch/train.sh" in readme and "make test" in readme


def test_split_recipe_args():
    from resure_ds.config import split_recipe_args

    assert split_recipe_args(["recipes/default.yaml", "train.lr=1"]) == ("recipes/default.yaml", ["train.lr=1"])
    assert split_recipe_args(["r.yml"]) == ("r.yml", [])
    assert split_recipe_args(["train.lr=1", "x.yaml"]) == (None, ["train.lr=1", "x.yaml"])
    assert split_recipe_args([]) == (None, [])


def test_values_are_finite_and_in_range_and_yaml_is_strict(tmp_path, smollm2_path):
    """NaN and infinities enter no option (they passed for lr, tau, lam and grad_clip); a malformed override
    value, a key given twice in a recipe and a chat template file that does not exist are clear errors."""
    for o in ("train.lr=.nan", "resure.tau=.nan", "resure.lam=.inf", "train.grad_clip=-.inf", "stats.decay=.nan"):
        with pytest.raises(ConfigError, match=rf"{o.split('=')[0]}: must be a finite number"):
            load_config(None, [o])
    with pytest.raises(ConfigError, match="train.max_bad_steps: must be >= 0"):
        load_config(None, ["train.max_bad_steps=-1"])
    with pytest.raises(ConfigError, match=r"override 'train.lr=\[': the value is not valid YAML"):
        load_config(None, ["train.lr=["])
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    with pytest.raises(ConfigError, match="dup.yaml: invalid YAML: key 'lr' given twice"):
        load_config(str(dup))
    from resure_ds.models import load_tokenizer  # the template file is checked where it is read

    nope = load_config(None, ["model.chat_template=/nope/t.jinja"]).model.chat_template
    with pytest.raises(ConfigError, match="model.chat_template: '/nope/t.jinja' is neither a file nor Jinja text"):
        load_tokenizer(smollm2_path, nope)
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert load_tokenizer(smollm2_path, str(tmp_path / "t.jinja")).chat_template.startswith("{% for m")


def test_a_model_path_that_is_not_a_model_is_named(tmp_path):
    from resure_ds.models import check_model_folder

    with pytest.raises(FileNotFoundError, match="model.path=.*nope: no such folder"):
        check_model_folder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder .*lacks config.json, tokenizer.json"):
        check_model_folder(str(tmp_path / "empty"))
    check_model_folder("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id is left to transformers


def test_speed_options_refuse_what_they_cannot_do():
    """train.zero_stage (0-3 or auto), train.profile_steps (A-B) and model.compile (not with sequence
    parallelism): each bad value named with what to give."""
    assert load_config(None, ["train.zero_stage=auto"]).train.zero_stage == "auto"
    with pytest.raises(ConfigError, match="train.zero_stage: must be 0, 1, 2, 3 or auto, got 4"):
        load_config(None, ["train.zero_stage=4"])
    assert load_config(None, ["train.profile_steps=5-7"]).train.profile_steps == "5-7"
    assert load_config(None, ["train.profile_steps=3"]).train.profile_steps == 3
    for bad, why in (("0-2", "need 1 <= A <= B"), ("7-5", "need 1 <= A <= B"), ("x", "give the steps as A-B")):
        with pytest.raises(ConfigError, match=f"train.profile_steps='{bad}': {why}"):
            load_config(None, [f"train.profile_steps={bad}"])
    with pytest.raises(ConfigError, match="train.profile_steps=70-72: the run ends at train.max_steps=60, before step 70"):
        load_config(None, ["train.profile_steps=70-72"])
    with pytest.raises(ConfigError, match="model.compile with train.sequence_parallel"):
        load_config(None, ["model.compile=true", "train.sequence_parallel=2"])
