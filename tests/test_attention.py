"""resure_ds/runtime/attention.py: which attention `auto` picks, and the dialogue boundaries the
varlen path reads off position ids (its losses and gradients against the mask: test_packing.py)."""
import torch

from resure_ds.runtime import attention


def test_auto_picks_a_boundary_aware_kernel_only_on_a_gpu():
    assert attention.resolve("auto", cuda=False) == "sdpa"  # the CPU default keeps the mask
    on_gpu = attention.resolve("auto", cuda=True)
    import importlib.util  # flash-attn where it is installed (a GPU host may have it), else PyTorch's own

    has_flash = importlib.util.find_spec("flash_attn") is not None
    assert on_gpu == ("flash_attention_2" if has_flash else "varlen")
    assert has_flash or attention.torch_varlen() is not None
    for explicit in ("sdpa", "eager", "flash_attention_2", "varlen"):
        assert attention.resolve(explicit, cuda=True) == attention.resolve(explicit, cuda=False) == explicit


def test_boundaries_are_where_position_ids_restart_and_where_rows_start():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [5, 6, 0, 1, 2, 3]])  # row 3: a chunk's tail first
    cu, longest = attention.boundaries(pos, 3, 6)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 6, 12, 14, 18] and longest == 6
    again = pos.clone()
    again[0, 3] = 3  # the same values in a new tensor are recomputed, not taken from the cache
    assert attention.boundaries(again, 3, 6)[0].tolist() == [0, 5, 6, 12, 14, 18]
    # a padded batch's default position ids, [1, S], serve every row
    assert attention.boundaries(torch.arange(4)[None], 2, 4)[0].tolist() == [0, 4, 8]


def test_per_dialogue_attention_is_sdpa_under_the_block_diagonal_mask():
    """The CPU path against sdpa with the mask, including grouped key-value heads."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, D = 2, 4, 2, 10, 8
    q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (H, Hkv, Hkv))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 0, 1, 0]])
    out, _ = attention.varlen_attention(None, q, k, v, None, scaling=0.3, position_ids=pos)
    doc = (pos == 0).cumsum(1)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=0.3,
                                                            enable_gqa=True).transpose(1, 2)
    assert out.shape == (B, S, H, D)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
