"""docs/method.md s.5 on real DeepSpeed ZeRO-3: the same gradient for world size 1 vs 2 and
gradient accumulation 1 vs 2 over the same global batch with uneven token counts."""
import pytest
import torch

from tests.data_fixtures import OPENAI, SHAREGPT
from tests.dist import run_ranks

pytestmark = pytest.mark.slow  # real multi-process runs: minutes

GLOBAL = 4  # sequences in the global batch


WEIGHTS = [(1.0, 0.0), (0.5, 2.0), (0.25,), (3.0, 1.0)]  # per dialogue, per assistant turn: the records' data weights


def dialogues(weighted=False):
    from resure_ds.data.records import Dialogue

    long = [{"role": "user", "content": "Tell me about rivers."},
            {"role": "assistant", "content": "Rivers carry water from high ground to the sea, " * 3},
            {"role": "user", "content": "And lakes?"},
            {"role": "assistant", "content": "Lakes are still bodies of water."}]
    recs = [r["messages"] for r in OPENAI] + [long]
    sg = [{"role": "user" if c["from"] == "human" else "assistant", "content": c["value"]}
          for c in SHAREGPT[0]["conversations"]]
    return [Dialogue(f"d{i}", m, "test", weights=WEIGHTS[i] if weighted else None)
            for i, m in enumerate([recs[0], sg, recs[1], recs[2]])]


def worker(rank, world, model_path, grad_accum, run_dir, method="sft", weighted=False):
    from transformers import AutoTokenizer

    from resure_ds.runtime import engine as ds
    from resure_ds.config import load_config
    from resure_ds.data.collate import collate_examples
    from resure_ds.data.render import Renderer
    from resure_ds.report.audit import AuditLog
    from resure_ds.stats.method import Method
    from resure_ds.step import Stepper
    from resure_ds.testing import full_grads

    per_rank = GLOBAL // world
    mb = per_rank // grad_accum
    cfg = load_config(None, [f"model.path={model_path}", "model.dtype=fp32", f"train.method={method}",
                             f"train.grad_accum={grad_accum}", f"train.micro_batch_size={mb}",
                             "train.grad_clip=0", "train.zero_stage=3"])
    torch.manual_seed(0)
    engine = ds.Engine(cfg, model_path)
    # zero.Init: every parameter is a ZeRO-3 partition; outside forward no rank holds the full data of
    # any but the small ones DeepSpeed keeps gathered once fetched (ds_persist; the engine's start-up
    # check of the fused loss has run a forward)
    params = list(engine.module.parameters())
    partitioned = all(hasattr(p, "ds_numel") and (p.numel() == 0 or p.ds_persist)
                      and p.ds_tensor.numel() <= -(-p.ds_numel // world) for p in params)
    partitioned = partitioned and any(p.numel() == 0 for p in params)
    tok = AutoTokenizer.from_pretrained(model_path)
    exs = [Renderer(tok, 96).render(d) for d in dialogues(weighted)]
    mine = exs[rank * per_rank:(rank + 1) * per_rank]
    micro = [collate_examples(mine[i * mb:(i + 1) * mb], tok.pad_token_id) for i in range(grad_accum)]
    stepper = Stepper(cfg, engine, Method(cfg), AuditLog(run_dir, rank), ["test"], rank)
    n = stepper.global_token_count(micro)
    acc = {}
    for i, b in enumerate(micro):
        stepper.micro_backward(b, 1, n, acc)
        if i < grad_accum - 1:
            engine.step()
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    return {"grads": full_grads(engine), "n": n, "local": local_tokens, "stats": stepper.method.stats.state,
            "partitioned": partitioned}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_path):
    """World size 1, no accumulation: the reference gradient."""
    d = tmp_path_factory.mktemp("grad-base")
    return run_ranks(worker, 1, (tiny_model_path, 1, str(d / "run")), str(d))[0]


@pytest.mark.parametrize("world,grad_accum", [(1, 2), (2, 1), (2, 2)])
def test_same_gradient_for_world_size_and_accumulation(tmp_path, tiny_model_path, base, world, grad_accum):
    res = run_ranks(worker, world, (tiny_model_path, grad_accum, str(tmp_path / "run")), str(tmp_path))
    assert all(r["n"] == base["n"] for r in res)
    assert all(r["partitioned"] for r in res)
    if world == 2:
        assert res[0]["local"] != res[1]["local"]  # uneven token counts across ranks
    scale = max(g.abs().max().item() for g in base["grads"].values())
    assert scale > 0
    for r in res:
        for name, g in base["grads"].items():
            diff = (r["grads"][name] - g).abs().max().item()
            assert diff <= 1e-5 * max(scale, 1.0), (name, diff)
        # Same turns merged; their fp32 losses differ at rounding level between batch shapes
        # (padding changes matmul blocking). Exactness on equal inputs: test_welford_distributed.
        torch.testing.assert_close(r["stats"], base["stats"], rtol=1e-5, atol=1e-6)


def test_dft_gradient_is_the_probability_scaled_nll_on_two_ranks(tmp_path, tiny_model_path):
    """train.method=dft on 2 ranks of ZeRO-3: the gradient of sum over trained tokens of
    p.detach() * nll, divided by the global trained-token count, as plain torch computes it on one
    process from the same model and examples (and not SFT's gradient)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from resure_ds.data.collate import collate_examples
    from resure_ds.data.render import Renderer

    res = run_ranks(worker, 2, (tiny_model_path, 1, str(tmp_path / "run"), "dft"), str(tmp_path))
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    b = collate_examples([Renderer(tok, 96).render(d) for d in dialogues()], tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    labels = b["labels"][:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                          ignore_index=-100)
    trained = labels.reshape(-1) != -100
    assert res[0]["n"] == int(trained.sum())
    (nll[trained] * torch.exp(-nll[trained].detach())).sum().div(res[0]["n"]).backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    scale = max(g.abs().max().item() for g in want.values())
    sft = run_ranks(worker, 1, (tiny_model_path, 1, str(tmp_path / "sft")), str(tmp_path))[0]["grads"]
    for r in res:
        assert set(r["grads"]) == set(want)
        for name, g in want.items():
            assert (r["grads"][name] - g).abs().max().item() <= 1e-5 * max(scale, 1.0), name
    assert max((sft[n] - g).abs().max().item() for n, g in want.items()) > 1e-3 * scale  # not SFT's


def test_data_weights_scale_each_turns_loss_and_context_turns_never_train(tmp_path, tiny_model_path):
    """Per-message control on 2 ranks of ZeRO-3 (docs/method.md s.5): the gradient of sum over trained
    tokens of the turn's data weight * nll over the global trained-token count, as plain torch computes
    it; a context-only turn (weight 0) has no trained token, so it is neither in that count nor in the
    statistics, and the weighted turns' losses enter the statistics unweighted."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from resure_ds.data.collate import collate_examples
    from resure_ds.data.render import Renderer

    res = run_ranks(worker, 2, (tiny_model_path, 1, str(tmp_path / "run"), "sft", True), str(tmp_path))
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    plain = collate_examples([Renderer(tok, 96).render(d) for d in dialogues()], tok.pad_token_id)
    b = collate_examples([Renderer(tok, 96).render(d) for d in dialogues(True)], tok.pad_token_id)
    assert torch.equal(b["input_ids"], plain["input_ids"])  # the same tokens; only which train changes
    context = (plain["turn_ids"] == 1) & (torch.arange(4)[:, None] == 0)  # dialogue 0's turn 1: weight 0
    assert context.any() and torch.equal(b["turn_ids"], torch.where(context, -1, plain["turn_ids"]))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    labels, turn = b["labels"][:, 1:], b["turn_ids"][:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                          ignore_index=-100).view(labels.shape)
    w = torch.tensor([[WEIGHTS[d][t] if t >= 0 else 0.0 for t in row.tolist()] for d, row in enumerate(turn)])
    trained = labels != -100
    assert res[0]["n"] == int(trained.sum())
    (w * nll)[trained].sum().div(res[0]["n"]).backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    scale = max(g.abs().max().item() for g in want.values())
    for r in res:
        for name, g in want.items():
            assert (r["grads"][name] - g).abs().max().item() <= 1e-5 * max(scale, 1.0), name
    # the statistics: every turn that trains, with its unweighted loss (bucket n and mean over both ranks)
    means = [nll[d][turn[d] == t].mean().item() for d in range(4) for t in sorted(set(turn[d].tolist()) - {-1})]
    st = res[0]["stats"]  # [buckets, (n, mean, M2, non-finite, W)]
    assert st[:, 0].sum().item() == len(means) == 6
    assert (st[:, 0] * st[:, 1]).sum().item() == pytest.approx(sum(means), rel=1e-5)
