import torch
import torch.nn.functional as F

from resure_ds.data import IGNORE
from resure_ds.stats.turns import shift_targets, turn_losses, weighted_loss_sum
from resure_ds.runtime.nll import token_nll


def random_batch(B=4, S=40, V=97, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=g, dtype=torch.float64)
    input_ids = torch.randint(0, V, (B, S), generator=g)
    turn_ids = torch.full((B, S), -1)
    for b in range(B):
        pos, t = 2, 0
        length = S - 3 * b  # padded: later rows shorter
        while pos < length - 2 and t < T:
            n = int(torch.randint(1, 6, (1,), generator=g))
            turn_ids[b, pos:min(pos + n, length)] = t
            pos += n + int(torch.randint(1, 4, (1,), generator=g))
            t += 1
    labels = torch.where(turn_ids >= 0, input_ids, IGNORE)
    return logits, labels, turn_ids


def reference(logits, labels, turn_ids):
    """Turn by turn, the obvious way."""
    out = {}
    B, S, _ = logits.shape
    for b in range(B):
        for t in sorted(set(turn_ids[b].tolist()) - {-1}):
            pos = [s for s in range(1, S) if turn_ids[b, s] == t]
            nll = [F.cross_entropy(logits[b, s - 1:s], labels[b, s:s + 1]).item() for s in pos]
            out[(b, t)] = (sum(nll) / len(nll), len(nll))
    return out


def test_batched_turn_losses_match_turn_by_turn_reference():
    for seed in range(3):
        logits, labels, turn_ids = random_batch(seed=seed)
        tg = shift_targets(labels, turn_ids)
        res = turn_losses(token_nll(logits, tg.labels, chunk_rows=7), tg, labels.shape[0], int(turn_ids.max()) + 1)
        ref = reference(logits, labels, turn_ids)
        present = {(b, t) for b, t in zip(*torch.nonzero(res.count > 0, as_tuple=True)) for b, t in [(int(b), int(t))]}
        assert present == set(ref)
        for (b, t), (mean, count) in ref.items():
            assert res.count[b, t] == count
            assert abs(res.mean[b, t].item() - mean) < 1e-5 * max(1.0, mean)
        assert torch.isnan(res.mean[res.count == 0]).all()


def test_chunking_does_not_change_nll():
    logits, labels, turn_ids = random_batch(S=33)
    tgt = shift_targets(labels, turn_ids).labels
    a = token_nll(logits, tgt, chunk_rows=5)
    b = token_nll(logits, tgt, chunk_rows=10 ** 6)
    assert torch.equal(a, b)
    assert (a[tgt == IGNORE] == 0).all()


def test_weighted_loss_gradient_is_weighted_token_sum():
    logits, labels, turn_ids = random_batch(seed=5)
    logits.requires_grad_(True)
    tg = shift_targets(labels, turn_ids)
    tgt, tt = tg.labels, tg.turn
    T = int(turn_ids.max()) + 1
    res = turn_losses(token_nll(logits, tgt), tg, labels.shape[0], T)
    w = torch.rand(res.count.shape, generator=torch.Generator().manual_seed(1))
    weighted_loss_sum(res, w).backward()
    g1 = logits.grad.clone()
    logits.grad = None
    nll = token_nll(logits, tgt)
    tok_w = torch.where(tt >= 0, w.gather(1, tt.clamp(min=0)).double(), torch.zeros_like(nll))
    (nll * tok_w).sum().backward()
    assert torch.allclose(g1, logits.grad, atol=1e-12)


def test_nonfinite_turn_contributes_nothing():
    logits, labels, turn_ids = random_batch(seed=2)
    tg = shift_targets(labels, turn_ids)
    res = turn_losses(token_nll(logits, tg.labels), tg, labels.shape[0], int(turn_ids.max()) + 1)
    bad = res._replace(mean=res.mean.clone())
    bad.mean[0, 0] = float("nan")
    ones = torch.ones_like(res.mean, dtype=torch.float32)
    diff = weighted_loss_sum(res, ones) - weighted_loss_sum(bad, ones)
    assert abs(diff.item() - res.sum[0, 0].item()) < 1e-5 * res.sum.sum().item()  # fp32 sums


def test_chunked_nll_value_and_gradient_match_cross_entropy():
    for dtype, tol in ((torch.float64, 1e-6), (torch.bfloat16, 2e-2)):
        logits, labels, turn_ids = random_batch(seed=7)
        logits = logits.to(dtype)
        tgt = shift_targets(labels, turn_ids).labels
        g = torch.rand(tgt.shape, generator=torch.Generator().manual_seed(3))
        a = logits.clone().requires_grad_(True)
        (token_nll(a, tgt, chunk_rows=13) * g).sum().backward()
        b = logits.clone().float().requires_grad_(True)
        ref = F.cross_entropy(b.view(-1, b.shape[-1]), tgt.view(-1), ignore_index=IGNORE, reduction="none")
        (ref.view(tgt.shape) * g).sum().backward()
        assert torch.allclose(token_nll(logits, tgt).float(), ref.view(tgt.shape).detach(), atol=tol)
        assert a.grad.dtype == dtype
        assert torch.allclose(a.grad.float(), b.grad, atol=tol)
        assert (a.grad[tgt == IGNORE] == 0).all()


def test_dft_scales_each_token_by_its_detached_probability():
    """train.method=dft: token loss p.detach() * nll, so d/d nll = p (the scale carries no gradient);
    the other methods train the NLL itself (token_loss is None)."""
    from resure_ds.config import load_config
    from resure_ds.stats.method import Method

    nll = torch.tensor([[0.1, 2.0, 0.0, 7.0]], dtype=torch.float32, requires_grad=True)
    out = Method(load_config(None, ["train.method=dft"])).token_loss(nll)
    torch.testing.assert_close(out, nll.detach() * torch.exp(-nll.detach()))
    out.sum().backward()
    torch.testing.assert_close(nll.grad, torch.exp(-nll.detach()))
    assert out[0, 2] == 0  # an untrained position (NLL 0) stays 0
    for m in ("sft", "resure", "loss_truncation"):
        assert Method(load_config(None, [f"train.method={m}"])).token_loss(nll) is None
