"""LoRA (model.lora, resure_ds/runtime/lora.py): the merge arithmetic, and a real 2-rank ZeRO-3 run whose
exports reload: the merged folder with plain transformers, the adapter with PEFT on the base."""
import json
import os

import pytest
import torch

from resure_ds.config import LoraConfig
from resure_ds.runtime.lora import merged_state_dict
from tests.e2e_common import launch, metrics


def test_merge_folds_the_scaled_update_into_the_weight():
    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(6, 4, generator=g), torch.randn(2, 4, generator=g), torch.randn(6, 2, generator=g)
    sd = {"m.q_proj.base_layer.weight": w, "m.q_proj.base_layer.bias": torch.ones(6),
          "m.q_proj.lora_A.default.weight": a, "m.q_proj.lora_B.default.weight": b, "m.norm.weight": torch.ones(4)}
    out = merged_state_dict(sd, LoraConfig(rank=2, alpha=8.0))
    assert set(out) == {"m.q_proj.weight", "m.q_proj.bias", "m.norm.weight"}
    torch.testing.assert_close(out["m.q_proj.weight"], w + 4.0 * b @ a)
    x = torch.randn(3, 4, generator=g)  # the merged layer computes what base + adapter computed
    torch.testing.assert_close(x @ out["m.q_proj.weight"].T, x @ w.T + 4.0 * (x @ a.T) @ b.T)


@pytest.mark.slow
def test_lora_under_zero3_on_two_ranks_exports_models_that_reload(tmp_path, tiny_model_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    args = ["recipes/default.yaml", f"model.path={tiny_model_path}", "model.lora.rank=8", "model.lora.alpha=16",
            "model.lora.export=both", "checkpoint.export_dtype=fp32", "checkpoint.every=2", "data.max_length=128",
            "data.overflow=cut",  # (as measured before split: more turns a step, so 4 steps warm ReSURE up)
            "train.micro_batch_size=2", "train.lr=1e-2", "resure.min_count=4", f"output.dir={tmp_path}",
            "output.name=lora", "output.report=false", "output.plot=false",
            "model.dtype=fp32"]  # auto is bf16 on AVX512-BF16 CPUs: frozen weights would come back bf16-rounded
    out = launch("train.sh", [*args, "train.max_steps=2"], extra_env={"NUM_PROCS": "2"})
    assert "LoRA rank 8 on all-linear: 16,384 trainable of" in out.stdout + out.stderr
    out = launch("train.sh", [*args, "train.max_steps=4"], extra_env={"NUM_PROCS": "2"})  # resumes the adapters
    assert "resum" in (out.stdout + out.stderr).lower()
    run = os.path.join(tmp_path, "lora")
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert any(r["mean_weight"] < 1 for r in rows)  # ReSURE weighs turns as in full fine-tuning
    export = os.path.join(run, "export")
    with open(os.path.join(export, "adapter", "adapter_config.json"), encoding="utf-8") as f:
        conf = json.load(f)
    assert conf["r"] == 8 and conf["lora_alpha"] == 16 and conf["peft_type"] == "LORA"

    base = load_file(os.path.join(tiny_model_path, "model.safetensors"))
    merged = load_file(os.path.join(export, "model.safetensors"))
    assert set(merged) == set(base)  # the model's own key names: no adapter left in the merged folder
    adapted = {k for k in base if not torch.equal(base[k].float(), merged[k].float())}
    # the adapters moved every Linear layer but the head; the rest (embeddings, norms) stayed frozen
    assert adapted and all(k.endswith("proj.weight") for k in adapted), sorted(adapted)
    assert len(adapted) == sum(k.endswith("proj.weight") for k in base)

    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)(ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32),
                                         os.path.join(export, "adapter"))(ids).logits
        before = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(plain, peft, rtol=1e-4, atol=1e-4)
    assert (plain - before).abs().max() > 1e-3  # and training changed what the model computes
