"""Values a careless or hostile user gives, refused where they are read, each with one line that names
the value and the fix (docs/operating.md, the rules)."""
import json
import os
import shutil

import pytest

from resure_ds.config import ConfigError, load_config


@pytest.mark.parametrize("name", ["", ".", "..", "../..", "a/b"])
def test_output_name_is_one_folder_under_output_dir(name):
    """An empty name wrote the run's files straight into output.dir; '../..' climbed out of it."""
    with pytest.raises(ConfigError, match="output.name: one folder name under output.dir"):
        load_config(None, [f"output.name='{name}'"])


@pytest.mark.parametrize("weight", [".inf", "-1", "0", ".nan"])
def test_a_mixture_weight_must_be_finite_and_positive(weight):
    with pytest.raises(ConfigError, match="weight must be a (finite )?number"):
        load_config(None, [f"data.train=[{{path: a.jsonl, weight: {weight}}}, {{path: b.jsonl}}]"])


def test_a_tokenizer_that_needs_remote_code_names_the_option(tmp_path, smollm2_path):
    from resure_ds.models import load_tokenizer

    folder = tmp_path / "custom"
    shutil.copytree(smollm2_path, folder)
    with open(folder / "config.json", encoding="utf-8") as f:
        conf = json.load(f)
    conf.update(model_type="custom_x", auto_map={"AutoConfig": "custom_cfg.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(conf))
    for name in ("custom_cfg.py", "custom_tok.py"):
        (folder / name).write_text("raise SystemExit('this code must never run')\n")
    with open(folder / "tokenizer_config.json", encoding="utf-8") as f:
        tok = json.load(f)
    tok.pop("tokenizer_class", None)
    tok["auto_map"] = {"AutoTokenizer": ["custom_tok.CustomTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match="set model.trust_remote_code=true"):
        load_tokenizer(str(folder))
    assert os.path.exists(folder / "custom_cfg.py")


def test_the_run_folder_is_never_inside_or_around_the_training_data(tmp_path):
    from resure_ds.runtime.run_folder import check_place as check_run_folder

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("{}\n")
    for out_dir, name, how in ((tmp_path / "data", "run", "lies inside"), (tmp_path, "data", "is"),
                               (tmp_path.parent, tmp_path.name, "holds")):
        cfg = load_config(None, [f"data.train={tmp_path / 'data'}", f"output.dir={out_dir}", f"output.name={name}"])
        with pytest.raises(ConfigError, match=f"the run folder \\(output.dir/output.name\\) .* {how} .*data, an input"):
            check_run_folder(cfg, os.path.join(cfg.output.dir, cfg.output.name))
    ok = load_config(None, [f"data.train={tmp_path / 'data'}", f"output.dir={tmp_path / 'runs'}"])
    check_run_folder(ok, os.path.join(ok.output.dir, ok.output.name))
    as_url = load_config(None, [f"data.train=file://{tmp_path / 'data'}", f"output.dir={tmp_path / 'data'}"])
    with pytest.raises(ConfigError, match="lies inside"):  # file:///x is the local path /x
        check_run_folder(as_url, os.path.join(as_url.output.dir, as_url.output.name))
