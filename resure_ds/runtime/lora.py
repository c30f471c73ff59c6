"""LoRA through PEFT, under any ZeRO stage (model.lora).

The adapters are injected into the Hugging Face model in place (`peft.inject_adapter_in_model`),
before DeepSpeed wraps it: the model keeps its class, its forward and its head, so the fused head
and loss, packing and ReSURE see the same model as in full fine-tuning. Only the adapters'
parameters require gradients, and only they reach the optimizer. Under ZeRO-3 the adapters are
created whole on each rank and DeepSpeed partitions them when it wraps the model.

Exports, from the gathered state dict (rank 0):
  merged   W + (alpha / r) B A written into each adapted weight, the adapters dropped: a plain
           model folder for plain transformers.
  adapter  PEFT's adapter folder (adapter_config.json, adapter_model.safetensors with PEFT's key
           names), loaded with `PeftModel.from_pretrained(base_model, folder)`.
"""
from __future__ import annotations

import json
import os

import torch

from ..config import LoraConfig
from ..errors import ConfigError

ADAPTER = "default"  # PEFT's adapter name for the one adapter we train


def peft_config(lc: LoraConfig, base_model: str | None = None):
    from peft import LoraConfig as PeftLora

    return PeftLora(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.targets,
                    bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model)


def attach(model: torch.nn.Module, lc: LoraConfig) -> tuple[int, int]:
    """Inject rank-lc.rank adapters and freeze everything else; returns (trainable, total)
    parameter counts (ZeRO-3 partitioned weights counted by their full size)."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(peft_config(lc), model, adapter_name=ADAPTER)
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    if not trainable:
        raise ConfigError(f"model.lora.targets={lc.targets!r} matched no module of this model: name Linear "
                          "layers it has (e.g. q_proj, v_proj) or use all-linear")
    return trainable, total


def _pairs(sd: dict) -> dict[str, tuple[str, str]]:
    """Adapted weight key -> (lora_A key, lora_B key), from the gathered state dict."""
    out = {}
    for key in sd:
        if key.endswith(f".lora_A.{ADAPTER}.weight"):
            stem = key[: -len(f".lora_A.{ADAPTER}.weight")]
            out[f"{stem}.base_layer.weight"] = (key, f"{stem}.lora_B.{ADAPTER}.weight")
    return out


def merged_state_dict(sd: dict, lc: LoraConfig) -> dict:
    """The adapters folded into their weights, under the model's own key names."""
    scale = lc.alpha / lc.rank
    out = {}
    pairs = _pairs(sd)
    for key, value in sd.items():
        if ".lora_" in key:
            continue
        if key in pairs:
            a, b = (sd[k].float() for k in pairs[key])
            value = (value.float() + scale * (b @ a)).to(value.dtype)
            key = key.replace(".base_layer.weight", ".weight")
        else:
            key = key.replace(".base_layer.", ".")
        out[key] = value
    return out


def save_adapter(sd: dict, lc: LoraConfig, out_dir: str, base_model: str, dtype: torch.dtype) -> None:
    """PEFT's adapter folder: its config and the adapter weights of the gathered state dict `sd`,
    in `dtype`, under PEFT's key names."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    weights = {f"base_model.model.{k.replace(f'.{ADAPTER}.', '.')}": v.to(dtype).contiguous()
               for k, v in sd.items() if ".lora_" in k}
    save_file(weights, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    conf = peft_config(lc, base_model).to_dict()
    with open(os.path.join(out_dir, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump({k: sorted(v) if isinstance(v, set) else v for k, v in conf.items()}, f, indent=2)
