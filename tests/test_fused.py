"""resure_ds/runtime/fused.py: the fused LM head + NLL gives the logits path's losses and gradients."""
import pytest
import torch
import torch.nn.functional as F

from resure_ds.data import IGNORE
from resure_ds.runtime.fused import FusedHead, fusable, install, linear_nll
from resure_ds.stats.turns import shift_targets, turn_losses
from resure_ds.runtime.nll import token_nll


def problem(B=3, S=20, H=16, V=50, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_() if bias else None
    targets = torch.randint(0, V, (B, S), generator=g)
    targets[torch.rand(B, S, generator=g) < 0.4] = IGNORE  # untrained positions
    return hidden, weight, b, targets


def grads_of(loss, *xs):
    return torch.autograd.grad(loss, [x for x in xs if x is not None])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 4096])  # one row per chunk, ragged chunks, one chunk
def test_same_nll_and_gradients_as_the_logits_path(bias, rows):
    hidden, weight, b, targets = problem(bias=bias)
    g = torch.rand(targets.shape, generator=torch.Generator().manual_seed(1))  # per-token weights
    ref = token_nll(F.linear(hidden, weight, b), targets)
    fused = linear_nll(hidden, weight, b, targets, rows=rows)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    assert (fused[targets == IGNORE] == 0).all() and (fused[targets != IGNORE] > 0).all()
    for a, r in zip(grads_of((fused * g).sum(), hidden, weight, b), grads_of((ref * g).sum(), hidden, weight, b)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_untrained_rows_get_no_gradient():
    hidden, weight, _, targets = problem()
    (gh,) = grads_of(linear_nll(hidden, weight, None, targets).sum(), hidden)
    assert (gh[targets == IGNORE] == 0).all() and gh[targets != IGNORE].abs().sum() > 0


def test_no_trained_token_is_zero_loss_and_zero_gradient():
    hidden, weight, _, targets = problem()
    targets[:] = IGNORE
    out = linear_nll(hidden, weight, None, targets)
    gh, gw = grads_of(out.sum(), hidden, weight)
    assert out.abs().sum() == 0 and gh.abs().sum() == 0 and gw.abs().sum() == 0


def test_fused_head_is_a_drop_in_linear():
    lin = torch.nn.Linear(8, 11, bias=False)
    head = FusedHead(lin)
    x = torch.randn(2, 3, 8)
    assert head.weight is lin.weight and torch.equal(head(x), lin(x))
    assert [n for n, _ in head.named_parameters()] == ["weight"]


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return tiny_model_path, AutoModelForCausalLM


def packed_batch(vocab):
    """Two rows, the first packing two dialogues (positions restart), turn ids on some tokens."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None].repeat(2, 1)
    pos[1] = torch.arange(24)
    doc = torch.tensor([[0] * 10 + [1] * 14, [2] * 24])
    turn = torch.full((2, 24), -1)
    turn[0, 4:9], turn[0, 15:20], turn[0, 21:24], turn[1, 5:12], turn[1, 16:23] = 0, 0, 1, 0, 1
    labels = torch.where(turn >= 0, ids, IGNORE)
    return ids, pos, shift_targets(labels, turn, doc)


def test_on_a_real_model_the_same_turn_losses_and_gradients(tiny):
    """A tied-embedding Llama, packed rows: per-turn losses within 1e-5 relative and every
    parameter's gradient as the model's own logits give them."""
    path, auto = tiny
    torch.manual_seed(0)
    ref_model = auto.from_pretrained(path, dtype=torch.float32)
    model = auto.from_pretrained(path, dtype=torch.float32)
    assert model.config.tie_word_embeddings and fusable(model) is None
    install(model)
    head = model.get_output_embeddings()
    assert isinstance(head, FusedHead) and head.weight is model.get_input_embeddings().weight  # still tied
    ids, pos, tg = packed_batch(model.config.vocab_size)
    nll_ref = token_nll(ref_model(input_ids=ids, position_ids=pos, use_cache=False).logits, tg.labels)
    nll = model(input_ids=ids, position_ids=pos, use_cache=False, targets=tg.labels)
    ref_t, t = turn_losses(nll_ref, tg, 3, 2), turn_losses(nll, tg, 3, 2)
    assert torch.equal(ref_t.count, t.count) and int(t.count.sum()) > 0
    torch.testing.assert_close(t.mean, ref_t.mean, rtol=1e-5, atol=0, equal_nan=True)
    w = torch.tensor([[1.0, 0.3], [0.7, 1.0], [0.5, 0.2]])  # per-turn weights, as ReSURE gives
    (w * t.sum).sum().backward()
    (w * ref_t.sum).sum().backward()
    ref_grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        r = ref_grads[name].grad
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()), msg=name)
    # without targets: the model's own forward, logits as before
    torch.testing.assert_close(model(input_ids=ids, position_ids=pos).logits,
                               ref_model(input_ids=ids, position_ids=pos).logits)


def test_a_model_without_a_linear_head_is_not_fusable(tiny):
    path, auto = tiny
    model = auto.from_pretrained(path)
    model.set_output_embeddings(torch.nn.Sequential(model.get_output_embeddings()))
    assert "Sequential" in fusable(model)
