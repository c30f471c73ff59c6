"""Packing on a real model (fp32), with each attention backend that runs on CPU (model.attn_implementation):
the same dialogues give the same per-turn losses and the same gradient packed or padded, and no
dialogue sees another one of its row; varlen (attention per dialogue, no mask) gives what the
block-diagonal mask gives."""
import pytest
import torch

from resure_ds.data.collate import collate
from resure_ds.data.records import read_dialogues
from resure_ds.data.render import Renderer
from resure_ds.stats.turns import shift_targets, turn_losses, weighted_loss_sum
from resure_ds.runtime.nll import token_nll


def load(path: str, attn: str):
    from transformers import AutoModelForCausalLM

    from resure_ds.runtime import attention

    attention.register()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    return model


def examples(tokenizer):
    ds = [d for _, d in zip(range(12), read_dialogues("chitchat", skip_invalid=True))]
    return [e for e in Renderer(tokenizer, 160).render_many(ds) if e is not None][:9]


def rows_of(exs, budget: int = 400):
    """Greedy rows of at most `budget` tokens: several dialogues per row."""
    rows, row, used = [], [], 0
    for e in exs:
        if used + len(e.input_ids) > budget:
            rows, row, used = rows + [row], [], 0
        row, used = row + [e], used + len(e.input_ids)
    return rows + [row]


@pytest.fixture(scope="module", params=["sdpa", "eager", "varlen"])
def setup(request, tiny_model_path, tokenizer):
    torch.manual_seed(0)
    return load(tiny_model_path, request.param), examples(tokenizer)


def per_turn(model, batch):
    """Per-(dialogue, turn) mean losses and the gradient of sum(w * NLL) with fixed weights."""
    model.zero_grad()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits
    tg = shift_targets(batch["labels"], batch["turn_ids"], batch["doc_ids"])
    turns = turn_losses(token_nll(logits, tg.labels), tg, len(batch["dialogue_ids"]), batch["partial"].shape[1])
    w = torch.linspace(0.2, 1.0, turns.sum.numel()).view_as(turns.sum)  # uneven weights per turn
    weighted_loss_sum(turns, w).backward()
    losses = {(did, t): (turns.mean[d, t].item(), int(turns.count[d, t]))
              for d, did in enumerate(batch["dialogue_ids"]) for t in range(turns.mean.shape[1])
              if turns.count[d, t] > 0}
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_and_padded_give_the_same_turn_losses_and_gradient(setup, tokenizer):
    model, exs = setup
    padded = collate([[e] for e in exs], tokenizer.pad_token_id, packed=False)
    rows = rows_of(exs)
    assert max(len(r) for r in rows) >= 3
    packed = collate(rows, tokenizer.pad_token_id, packed=True)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    la, ga = per_turn(model, padded)
    lb, gb = per_turn(model, packed)
    assert set(la) == set(lb) and len(la) > 20
    for k, (m, c) in la.items():
        assert lb[k][1] == c
        assert abs(lb[k][0] - m) <= 1e-5 * abs(m), k
    # The weights follow (dialogue, turn) in both layouts: turn ids and slots line up, so the
    # weighted gradient is the same (the weight tensor is indexed by dialogue slot, same order).
    scale = max(g.abs().max().item() for g in ga.values())
    for n in ga:
        assert (ga[n] - gb[n]).abs().max().item() <= 1e-5 * scale, n


def test_a_dialogue_never_sees_another_in_its_row(setup, tokenizer):
    model, exs = setup
    a, b, c = exs[0], exs[1], exs[2]
    row = collate([[a, b, c]], tokenizer.pad_token_id, packed=True)
    changed = row["input_ids"].clone()
    lo, hi = len(a.input_ids), len(a.input_ids) + len(b.input_ids)
    changed[0, lo:hi] = torch.randint(0, len(tokenizer), (hi - lo,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits
        y = model(input_ids=changed, position_ids=row["position_ids"], use_cache=False).logits
    assert (x[0, lo:hi] - y[0, lo:hi]).abs().max() > 0.1  # b itself changed
    assert (x[0, :lo] - y[0, :lo]).abs().max().item() <= 1e-6  # a: before b
    assert (x[0, hi:] - y[0, hi:]).abs().max().item() <= 1e-6  # c: after b, same row


def test_varlen_gives_the_masks_turn_losses_and_gradient_with_no_mask(tiny_model_path, tokenizer):
    """The same packed rows under sdpa (transformers' block-diagonal mask over the whole row) and
    varlen (boundaries from the position ids, attention per dialogue): the same per-turn losses and
    gradient, and transformers builds no mask for varlen."""
    from transformers.masking_utils import create_causal_mask

    exs = examples(tokenizer)
    packed = collate(rows_of(exs), tokenizer.pad_token_id, packed=True)
    mask_model, varlen_model = load(tiny_model_path, "sdpa"), load(tiny_model_path, "varlen")
    varlen_model.load_state_dict(mask_model.state_dict())
    la, ga = per_turn(mask_model, packed)
    lb, gb = per_turn(varlen_model, packed)
    assert set(la) == set(lb) and len(la) > 20
    for k, (m, c) in la.items():
        assert lb[k][1] == c and abs(lb[k][0] - m) <= 1e-5 * abs(m), k
    scale = max(g.abs().max().item() for g in ga.values())
    for n in ga:
        assert (ga[n] - gb[n]).abs().max().item() <= 1e-5 * scale, n
    embeds = torch.zeros(*packed["input_ids"].shape, 8)
    made = {attn: create_causal_mask(config=m.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                                     position_ids=packed["position_ids"])
            for attn, m in (("sdpa", mask_model), ("varlen", varlen_model))}
    S = packed["input_ids"].shape[1]
    assert made["sdpa"] is not None and tuple(made["sdpa"].shape[-2:]) == (S, S)  # the dense mask varlen avoids
    assert made["varlen"] is None
