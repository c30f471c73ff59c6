"""The engine's start-up checks on a real ZeRO-3 engine (1 gloo rank): a model that transforms its
logits after the head keeps the logits path (model.fused_loss=auto) or is refused (true), and a
model whose attention ignores restarting position ids is refused when rows are packed."""
import pytest

from tests.dist import run_ranks

pytestmark = pytest.mark.slow  # a spawned rank


def softcapped_gemma2(out: str) -> str:
    """A 2-layer Gemma 2 whose final soft-capping (tanh(logits / 0.5) * 0.5) bends every logit."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5)
    Gemma2ForCausalLM(cfg).save_pretrained(out)
    return out


def engines(rank, world, gemma, llama):
    import transformers.masking_utils as masking

    from resure_ds.config import load_config
    from resure_ds.errors import ConfigError
    from resure_ds.runtime.engine import Engine

    def built(path, *overrides):
        cfg = load_config(None, [f"model.path={path}", "model.dtype=fp32", "train.zero_stage=3", *overrides])
        try:
            return {"fused": Engine(cfg, path, vocab=256).fused}
        except ConfigError as e:
            return {"error": str(e)}

    seen = {"gemma_auto": built(gemma, "model.attn_implementation=eager"),  # Gemma 2 has no sdpa
            "gemma_true": built(gemma, "model.attn_implementation=eager", "model.fused_loss=true"),
            "llama": built(llama)}
    # a model class without packed-sequence support: its causal mask ignores restarting position ids
    masking.find_packed_sequence_indices = lambda position_ids: None
    seen["leaky_packed"] = built(llama)
    seen["leaky_padded"] = built(llama, "data.packing=false")
    return seen


def test_the_start_up_checks_catch_a_soft_capped_head_and_a_model_that_leaks_across_packed_dialogues(
        tmp_path, tiny_model_path):
    gemma = softcapped_gemma2(str(tmp_path / "gemma2"))
    [seen] = run_ranks(engines, 1, (gemma, tiny_model_path), str(tmp_path))
    assert seen["gemma_auto"] == {"fused": False}
    assert "it transforms its logits after the head. Set model.fused_loss=auto" in seen["gemma_true"]["error"]
    assert seen["llama"] == {"fused": True}
    assert "packed dialogues would see each other. Set data.packing=false" in seen["leaky_packed"]["error"]
    assert seen["leaky_padded"] == {"fused": True}
