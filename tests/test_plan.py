"""`resure-ds plan` on the shipped recipes, offline: the public architectures' config.json
(tests/fixtures/architectures) built on the meta device, DeepSpeed's state estimators, our
activation estimate; each recipe's header states what the plan prints."""
import os
import re
from dataclasses import replace

import pytest

from resure_ds.config import load_config
from resure_ds.plan import main
from resure_ds.runtime.memory import GB, HEADROOM, buffer_bytes, choose_stage, estimate, model_shape, state_bytes
from tests.conftest import ROOT

ARCH = os.path.join(ROOT, "tests", "fixtures", "architectures")
RECIPES = {"llama3.1-8b": ("llama3.1-8b", []), "qwen3-8b": ("qwen3-8b", []),
           "llama3.1-8b-lora": ("llama3.1-8b", ["--gpus", "1"]), "llama3.1-70b": ("llama3.1-70b", ["--nodes", "4"])}


def plan(capsys, *args):
    status = main(list(args))
    return status, capsys.readouterr().out


@pytest.mark.parametrize("arch,billions", [("llama3.1-8b", 8.03), ("llama3.1-70b", 70.55), ("qwen3-8b", 8.19)])
def test_the_fixtures_build_the_published_parameter_counts(arch, billions):
    s = model_shape(os.path.join(ARCH, arch), load_config(None, []))
    assert s.params / 1e9 == pytest.approx(billions, abs=0.01) and s.trainable == s.params


def test_states_follow_deepspeeds_arithmetic_and_lora_trains_the_adapters_only():
    cfg = load_config(os.path.join(ROOT, "recipes", "llama3.1-8b-lora.yaml"))
    s = model_shape(os.path.join(ARCH, "llama3.1-8b"), cfg)
    # rank 16 on q, k, v, o, gate, up, down of 32 layers: r * (in + out) each
    per_layer = 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert s.trainable == 32 * per_layer
    full = load_config(None, ["train.zero_stage=3"])
    f = model_shape(os.path.join(ARCH, "llama3.1-8b"), full)
    assert state_bytes(f, full, 8, 1) == pytest.approx(4 * f.largest_layer + 18 * f.params / 8, rel=1e-6)
    assert state_bytes(f, full, 8, 2) < state_bytes(f, full, 8, 1)  # more ranks, smaller shards


def test_buffers_are_deepspeeds_bucket_and_gathered_parameters_at_the_recipes_settings(tmp_path, smollm2_path):
    """What DeepSpeed allocates beside the states (benchmarks/plan_memory.py found a run here needs
    them): the gradient bucket, and at ZeRO-3 the parameters held gathered, both from train.ds_config
    or DeepSpeed's defaults."""
    s8 = model_shape(os.path.join(ARCH, "llama3.1-8b"), load_config(None, []))
    z3 = load_config(None, ["train.zero_stage=3", "model.dtype=bf16"])
    assert buffer_bytes(s8, z3) == pytest.approx(2 * 5e8 + 2 * 1e9)  # 8B: a billion parameters held
    fp32 = load_config(None, ["train.zero_stage=3", "model.dtype=fp32"])
    small = model_shape(smollm2_path, fp32)  # 135 M parameters: held whole
    assert buffer_bytes(small, fp32) == pytest.approx(4 * 5e8 + 4 * small.params)
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"reduce_bucket_size": 1e6, "stage3_max_live_parameters": 1e8}}')
    tuned = load_config(None, ["train.zero_stage=3", "model.dtype=bf16", f"train.ds_config={ds}"])
    assert buffer_bytes(s8, tuned) == pytest.approx(2 * 1e6 + 2 * 1e8)
    ds.write_text('{"zero_optimization": {"overlap_comm": true}}')
    z2 = load_config(None, ["train.zero_stage=2", "model.dtype=bf16", f"train.ds_config={ds}"])
    assert buffer_bytes(s8, z2) == pytest.approx(2 * 2 * 5e8)  # two buckets with overlap_comm
    assert buffer_bytes(s8, load_config(None, ["train.zero_stage=0"])) == 0


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_fits_as_its_header_says(capsys, name):
    arch, extra = RECIPES[name]
    recipe = os.path.join(ROOT, "recipes", f"{name}.yaml")
    status, out = plan(capsys, recipe, "--config", os.path.join(ARCH, arch), *extra)
    assert status == 0 and out.strip().endswith("fits"), out
    line = re.search(r"per GPU +(.*)", out).group(1)
    with open(recipe, encoding="utf-8") as f:
        assert line in f.read(), f"{name}.yaml's header is stale: {line}"


def test_a_job_that_cannot_fit_is_refused_with_the_change_that_fits(capsys):
    recipe = os.path.join(ROOT, "recipes", "llama3.1-70b.yaml")
    status, out = plan(capsys, recipe, "--config", os.path.join(ARCH, "llama3.1-70b"))  # 1 node, not 4
    assert status == 2 and "does not fit" in out and "ds_offload.json" in out and "or 3 nodes of 8 GPUs" in out
    status, out = plan(capsys, recipe, "--config", os.path.join(ARCH, "llama3.1-70b"), "--gpus", "1",
                       "--gpu-memory", "16", "data.max_length=32768")
    assert status == 2 and "does not fit" in out
    status, out = plan(capsys, recipe)  # the hub id is not here: say what to give
    assert status == 2


def test_the_embedded_default_plans_from_its_own_folder(capsys):
    status, out = plan(capsys, os.path.join(ROOT, "recipes", "default.yaml"), "--gpus", "2", "--gpu-memory", "24")
    assert status == 0 and "0.13 B parameters" in out and "steps/epoch" in out


def test_auto_zero_stage_is_the_lowest_whose_plan_fits():
    """train.zero_stage=auto (runtime/memory.choose_stage): the lowest stage whose plan fits 90% of a
    device; ZeRO-3 with the reason when none does. The plan CLI resolves it the same way."""
    cfg = load_config(None, ["train.zero_stage=auto", "model.dtype=bf16", "data.max_length=4096",
                             "train.micro_batch_size=1", "model.gradient_checkpointing=true"])
    s8 = model_shape(os.path.join(ARCH, "llama3.1-8b"), cfg)
    totals = {z: estimate(s8, replace(cfg, train=replace(cfg.train, zero_stage=z)), 8, 1)["total"] for z in range(4)}
    assert totals[0] > 80 * GB > HEADROOM * 80 * GB > totals[1]  # 16 bytes a parameter do not fit; sharded states do
    stage, why = choose_stage(s8, cfg, 8, 1, 80 * GB)
    assert stage == 1 and "the lowest stage" in why and f"ZeRO-0 {totals[0] / GB:.1f} GB" in why
    assert choose_stage(s8, cfg, 8, 1, 200 * GB)[0] == 0  # room for everything: no sharding
    assert choose_stage(s8, cfg, 1, 1, 80 * GB)[0] == 3  # one GPU: nothing fits
    assert "no stage's plan fits" in choose_stage(s8, cfg, 1, 1, 80 * GB)[1]
    # the boundary: a budget just under a stage's plan skips it
    edge = totals[1] / HEADROOM
    assert choose_stage(s8, cfg, 8, 1, edge * 1.001)[0] == 1 and choose_stage(s8, cfg, 8, 1, edge * 0.999)[0] > 1


def test_the_plan_resolves_auto(capsys):
    status, out = plan(capsys, os.path.join(ROOT, "recipes", "llama3.1-8b.yaml"), "train.zero_stage=auto",
                       "--config", os.path.join(ARCH, "llama3.1-8b"))
    assert status == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("zero stage"))
    stage = int(re.search(r"auto: ZeRO-(\d)", line).group(1))
    assert f"ZeRO-{stage}" in next(ln for ln in out.splitlines() if ln.startswith("job"))


def test_quotas_hold_for_weights_near_the_float_range():
    from resure_ds.data.order import quotas

    assert quotas([40, 40], [1e308, 1e308]).tolist() == [40, 40]  # their sum overflowed: 2 draws an epoch
    assert quotas([10, 30], [1e-300, 3e-300]).tolist() == [10, 30]


@pytest.mark.parametrize("flag,value", [("--gpus", "0"), ("--gpus", "-8"), ("--nodes", "0"), ("--gpu-memory", "nan"),
                                        ("--gpu-memory", "-1"), ("--gpu-memory", "1e300")])
def test_the_plan_refuses_counts_and_sizes_that_mean_nothing(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main([os.path.join(ROOT, "recipes", "default.yaml"), flag, value])
    # 1e300 GB was 'inf GB' in the printed plan: the memory has a ceiling no GPU comes near
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: must be a finite number > 0" in err and f"got '{value}'" in err


@pytest.mark.parametrize("change,match", [({"hidden_size": -5}, "transformers cannot build a causal LM .*hidden size \\(-5\\)"),
                                          ({"model_type": "nonesuch"}, "transformers cannot build a causal LM")])
def test_a_broken_model_config_is_one_line_naming_the_file(capsys, tmp_path, change, match):
    import json

    with open(os.path.join(ARCH, "llama3.1-8b", "config.json"), encoding="utf-8") as f:
        conf = {**json.load(f), **change}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    status = main([os.path.join(ROOT, "recipes", "default.yaml"), "--config", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert f"{tmp_path}/config.json: " in err
