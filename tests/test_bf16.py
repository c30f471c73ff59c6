"""model.bf16_matmul: bf16 products computed in fp32 from the bf16 operands, each result rounded to
bf16 (runtime/bf16.py), in isolation and inside a real ZeRO-3 engine (1 gloo rank)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from resure_ds.runtime import bf16
from tests.dist import run_ranks

BF = torch.bfloat16


def operands(*shapes):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g).to(BF) for s in shapes]


def test_each_product_is_the_fp32_product_of_the_bf16_operands_rounded():
    x, w, b, q, k, v = operands((3, 5, 16), (8, 16), (8,), (2, 2, 6, 8), (2, 2, 6, 8), (2, 2, 6, 8))
    want = {
        "linear": F.linear(x.float(), w.float(), b.float()).to(BF),
        "matmul": (x.float() @ w.float().t()).to(BF),
        "bmm": torch.bmm(x.float(), x.float().transpose(1, 2)).to(BF),
        "einsum": torch.einsum("bsh,oh->bso", x.float(), w.float()).to(BF),
        "baddbmm": torch.baddbmm(x.float()[:, :, :5], x.float(), x.float().transpose(1, 2)).to(BF),
        "sdpa": F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(BF),
    }
    with bf16.products("fp32") as mode:
        got = {"linear": F.linear(x, w, b), "matmul": x @ w.t(), "bmm": torch.bmm(x, x.transpose(1, 2)),
               "einsum": torch.einsum("bsh,oh->bso", x, w),
               "baddbmm": torch.baddbmm(x[:, :, :5], x, x.transpose(1, 2)),
               "sdpa": F.scaled_dot_product_attention(q, k, v, is_causal=True)}
        fp32_alone = F.linear(x.float(), w.float())  # fp32 operands: left as they are
    assert mode.calls == 6
    for name in want:
        assert got[name].dtype == BF, name
        assert torch.equal(got[name], want[name]), name
    assert fp32_alone.dtype == torch.float32
    with bf16.products("fp32") as mode:
        into, grown = torch.empty(3, 5, 8, dtype=BF)[:, :, :8], torch.empty(0, dtype=BF)
        assert torch.matmul(x, w.t(), out=into) is into and torch.mm(x[0], w.t(), out=grown) is grown
        acc = x[0] @ w.t()
        same = acc.addmm_(x[0], w.t(), beta=0.5, alpha=2.0)
        with pytest.raises(RuntimeError, match="dtype"):
            torch.mm(x[0], w.t().float())  # mixed operands fail as they do natively
    assert mode.calls == 4
    assert torch.equal(into, want["matmul"]) and torch.equal(grown, want["matmul"][0])
    wanted = (0.5 * want["matmul"][0].float() + 2.0 * (x[0].float() @ w.float().t())).to(BF)
    assert same is acc and torch.equal(acc, wanted)
    # the hardware's own bf16 kernel sums in fp32 too: the two agree to bf16's rounding
    native = F.linear(x, w, b)
    assert (native.float() - got["linear"].float()).abs().max() <= 2 ** -7 * got["linear"].float().abs().max()


class Below(TorchDispatchMode):
    """Entered before Fp32Matmul, so it sees each product after the mode did: the dtypes it ran in."""

    def __init__(self):
        super().__init__()
        self.ran = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in bf16.PRODUCTS:
            self.ran.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
        return func(*args, **(kwargs or {}))


def test_backward_products_are_moved_too_those_of_a_function_and_of_recomputed_activations():
    from torch.utils.checkpoint import checkpoint

    from resure_ds.runtime.fused import linear_nll

    x, w, w2 = operands((4, 16), (8, 16), (8, 8))
    x.requires_grad_(True)
    w.requires_grad_(True)
    g = operands((4, 8))[0]
    with Below() as below, bf16.products("fp32") as mode:
        y = F.linear(x, w)
        y.backward(g)
    assert mode.calls == 3 and below.ran == [{torch.float32}] * 3  # x @ w.T, then g @ w and g.T @ x
    assert x.grad.dtype == BF and w.grad.dtype == BF
    assert torch.equal(x.grad, (g.float() @ w.float()).to(BF))
    assert torch.equal(w.grad, (g.float().t() @ x.float()).to(BF))

    h, head = operands((1, 6, 16), (32, 16))
    h.requires_grad_(True)
    t = torch.randint(0, 32, (1, 6), generator=torch.Generator().manual_seed(0))
    with Below() as below, bf16.products("fp32") as mode:
        loss = linear_nll(h, head, None, t).sum()  # an autograd.Function with products in its backward
        assert mode.calls == 1
        loss.backward()
    assert mode.calls == 1 + 2 and below.ran == [{torch.float32}] * 3  # the head again (softmax), grad_h

    with Below() as below, bf16.products("fp32") as mode:  # two layers: the first's output is recomputed
        y = checkpoint(lambda a: F.linear(torch.relu(F.linear(a, w)), w2), x, use_reentrant=False)
        y.backward(g)
    # forward 2, the first layer recomputed 1, backward: g @ w2 (w2 needs no grad), then x's and w's
    assert mode.calls == 2 + 1 + 1 + 2 and below.ran == [{torch.float32}] * 6


def test_resolve():
    assert bf16.resolve("auto", "fp32", native_bf16=False) == "native"  # an fp32 run has no bf16 products
    assert bf16.resolve("fp32", "fp32", native_bf16=True) == "native"
    assert bf16.resolve("auto", "bf16", native_bf16=False) == "fp32"
    assert bf16.resolve("auto", "bf16", native_bf16=True) == "native"
    assert bf16.resolve("fp32", "bf16", native_bf16=True) == "fp32"
    assert bf16.resolve("native", "bf16", native_bf16=False) == "native"
    with bf16.products("native") as none:
        assert none is None


def one_step(rank, world, llama):
    from resure_ds.config import load_config
    from resure_ds.runtime import bf16 as mod
    from resure_ds.runtime.engine import Engine

    seen, real = {}, mod.products
    for dtype in ("fp32", "bf16"):  # (the native bf16 kernels of an AVX2 CPU take a minute on this head)
        cfg = load_config(None, [f"model.path={llama}", f"model.dtype={dtype}", "model.bf16_matmul=fp32",
                                 "train.zero_stage=3", "data.packing=false"])
        eng = Engine(cfg, llama, vocab=256)
        modes = []
        mod.products = lambda resolved: modes.append(real(resolved)) or modes[-1]  # every mode the engine enters
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 256, (2, 16), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1).to(eng.device)
        nll = eng.token_nll(batch, targets)
        forward_calls = sum(getattr(m, "calls", 0) for m in modes)
        eng.backward(nll.sum(), int((targets != -100).sum()))
        mod.products = real
        seen[dtype] = {"matmul": eng.matmul, "fused": eng.fused, "describe": eng.describe(world),
                        "forward_calls": forward_calls,
                        "backward_calls": sum(getattr(m, "calls", 0) for m in modes) - forward_calls,
                        "loss": float(nll.sum() / (targets != -100).sum())}
    return seen


@pytest.mark.slow  # a spawned rank
def test_a_bf16_engine_moves_its_products_to_fp32_in_forward_and_backward(tmp_path, tiny_model_path):
    [seen] = run_ranks(one_step, 1, (tiny_model_path,), str(tmp_path))
    fp32, moved = seen["fp32"], seen["bf16"]
    assert fp32["matmul"] == "native" and fp32["forward_calls"] == fp32["backward_calls"] == 0  # none to move
    assert moved["matmul"] == "fp32" and "bf16 with fp32 products" in moved["describe"]
    assert moved["forward_calls"] > 0
    # the fused head's backward computes its own products (an autograd.Function): moved as well
    assert moved["fused"] and moved["backward_calls"] > 0
    assert abs(moved["loss"] - fp32["loss"]) <= 0.02 * fp32["loss"]


def test_compiled_blocks_with_fp32_products_are_refused_before_the_model_loads(tiny_model_path):
    from resure_ds.config import load_config
    from resure_ds.errors import ConfigError
    from resure_ds.runtime.engine import Engine

    cfg = load_config(None, [f"model.path={tiny_model_path}", "model.dtype=bf16", "model.bf16_matmul=fp32",
                             "model.compile=true"])
    with pytest.raises(ConfigError, match="model.compile=true and bf16 products computed in fp32"):
        Engine(cfg, tiny_model_path)
