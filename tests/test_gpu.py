"""On a CUDA GPU: the fused loss in bf16, NCCL collectives and the statistics on the device,
DeepSpeed's fused Adam under the recipe's engine, and the varlen attention kernel against the mask. Skipped without CUDA (CI has none); run by
benchmarks/gpu/run.sh when the project is lent a GPU."""
import os

import pytest
import torch
import torch.nn.functional as F

from tests.dist import run_ranks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_model_path(tmp_path_factory):
    """A small Llama with SmolLM2's tokenizer: from the GPU bundle's folder (RESURE_GPU_TOKENIZER,
    see benchmarks/gpu/prepare.py) or the embedded model's."""
    from resure_ds.models import EMBEDDED, resolve_model_path
    from resure_ds.testing import random_llama

    src = os.environ.get("RESURE_GPU_TOKENIZER") or resolve_model_path(EMBEDDED)
    out = str(tmp_path_factory.mktemp("gpu-llama"))
    random_llama(src, out, shape=(256, 512, 2, 4, 2, 64))
    return out


def test_fused_loss_in_bf16_matches_the_logits_path():
    from resure_ds.data import IGNORE
    from resure_ds.runtime.fused import linear_nll
    from resure_ds.runtime.nll import token_nll

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(4, 512, 576, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(49152, 576, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    targets = torch.randint(0, 49152, (4, 512), device="cuda", generator=g)
    targets[torch.rand(4, 512, device="cuda", generator=g) < 0.5] = IGNORE
    ref = token_nll(F.linear(hidden, weight), targets)
    out = linear_nll(hidden, weight, None, targets)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    gr = torch.autograd.grad(ref.sum(), [hidden, weight])
    go = torch.autograd.grad(out.sum(), [hidden, weight])
    for a, b in zip(go, gr):
        assert a.dtype == torch.bfloat16
        cos = F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0)
        assert cos > 0.999, cos


def _nccl_stats(rank, world):
    from resure_ds import dist
    from resure_ds.stats.welford import Welford

    st = Welford(4)
    vals = torch.tensor([1.0, 2.0, 4.0], device="cuda", dtype=torch.float64)
    st.sync_update(vals, torch.tensor([0, 1, 1], device="cuda"), "cuda")
    red = dist.all_reduce_dict({"a": torch.tensor(2.0, device="cuda")}, device="cuda")
    # a collective given no device (the run folder's lock, zero_stage=auto) runs on this rank's GPU:
    # an NCCL group has no CPU backend
    return {"state_device": str(st.state.device), "n": st.n.cpu(), "a": red["a"],
            "default_device": str(dist._device(None))}


def test_nccl_one_rank_keeps_statistics_on_the_device(tmp_path):
    (r,) = run_ranks(_nccl_stats, 1, (), str(tmp_path), backend="nccl")
    assert r["state_device"].startswith("cuda")
    assert r["n"].tolist() == [1.0, 2.0, 0.0, 0.0] and r["a"] == 2.0
    assert r["default_device"].startswith("cuda"), r


def _fused_adam_steps(rank, world, model_path):
    from resure_ds.runtime import engine as ds
    from resure_ds.config import load_config
    from resure_ds.stats.turns import shift_targets

    cfg = load_config(None, [f"model.path={model_path}", "model.dtype=bf16", "train.zero_stage=3",
                             "train.micro_batch_size=2", "train.lr=1e-3"])
    eng = ds.Engine(cfg, model_path)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 64), generator=g)
    batch = {"input_ids": ids, "position_ids": torch.arange(64)[None].repeat(2, 1)}
    labels = ids.clone()
    tg = shift_targets(labels.cuda(), torch.zeros_like(labels).cuda())
    losses = []
    for _ in range(5):
        nll = eng.token_nll(batch, tg.labels)
        n = int((tg.labels != -100).sum())
        losses.append(float(nll.sum()) / n)
        eng.backward(nll.sum(), n)
        eng.step()
    return {"optimizer": type(eng.engine.optimizer.optimizer).__name__ if hasattr(eng.engine.optimizer, "optimizer")
            else type(eng.engine.optimizer).__name__, "fused": eng.fused, "losses": losses}


def test_deepspeed_fused_adam_trains_bf16_zero3(tmp_path, gpu_model_path):
    (r,) = run_ranks(_fused_adam_steps, 1, (gpu_model_path,), str(tmp_path), backend="nccl")
    assert r["fused"] and "FusedAdam" in r["optimizer"], r
    assert r["losses"][-1] < r["losses"][0], r["losses"]


def test_varlen_kernel_matches_the_mask_in_bf16(gpu_model_path, monkeypatch):
    """model.attn_implementation=varlen on the GPU (PyTorch's variable-length flash kernel, boundaries
    from the position ids) against sdpa under transformers' block-diagonal mask: the same packed rows,
    the same per-token losses and gradient within bf16's noise."""
    from transformers import AutoModelForCausalLM

    from resure_ds.runtime import attention

    assert attention.torch_varlen() is not None, f"torch {torch.__version__} has no torch.nn.attention.varlen"
    calls = []
    kernel = attention._kernel
    monkeypatch.setattr(attention, "_kernel", lambda *a: calls.append(1) or kernel(*a))
    attention.register()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (2, 1024), generator=g).cuda()
    rows = [[300, 500, 224], [1024]]  # dialogue lengths per row
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in rows]).cuda()
    out = {}
    for attn in ("sdpa", "varlen"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(gpu_model_path, dtype=torch.bfloat16,
                                                     attn_implementation=attn).cuda()
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        nll.sum().backward()
        out[attn] = nll.detach(), torch.cat([p.grad.float().flatten() for p in model.parameters()])
    assert calls, "the varlen path did not reach the GPU kernel"
    torch.testing.assert_close(out["varlen"][0], out["sdpa"][0], rtol=0, atol=0.1)
    assert (out["varlen"][0] - out["sdpa"][0]).abs().mean() < 0.01
    cos = F.cosine_similarity(out["varlen"][1], out["sdpa"][1], dim=0)
    assert cos > 0.99, cos
