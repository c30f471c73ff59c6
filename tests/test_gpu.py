"""On a CUDA GPU: the fused loss in bf16, NCCL collectives and the statistics on the device, and
DeepSpeed's fused Adam under the recipe's engine. Skipped without CUDA (CI has none); run by
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
    from resure_ds.models import EMBEDDED, random_llama, resolve_model_path

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
    from resure_ds.runtime import dist
    from resure_ds.stats.welford import Welford

    st = Welford(4)
    vals = torch.tensor([1.0, 2.0, 4.0], device="cuda", dtype=torch.float64)
    st.sync_update(vals, torch.tensor([0, 1, 1], device="cuda"), "cuda")
    red = dist.all_reduce_dict({"a": torch.tensor(2.0, device="cuda")}, device="cuda")
    return {"state_device": str(st.state.device), "n": st.n.cpu(), "a": red["a"]}


def test_nccl_one_rank_keeps_statistics_on_the_device(tmp_path):
    (r,) = run_ranks(_nccl_stats, 1, (), str(tmp_path), backend="nccl")
    assert r["state_device"].startswith("cuda")
    assert r["n"].tolist() == [1.0, 2.0, 0.0, 0.0] and r["a"] == 2.0


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
