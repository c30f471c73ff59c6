"""model.compile (runtime/engine.compile_blocks): each transformer block under torch.compile, one
graph for rows of any length; the same per-token losses and gradient as eager, in fp32 on CPU."""
import pytest
import torch

from resure_ds.runtime.engine import compile_blocks

pytestmark = pytest.mark.slow  # inductor compiles C++ on the first call: about 15 s here


def nll_and_grads(model, ids, pos):
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    nll.sum().backward()
    return nll.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_blocks_train_like_eager_and_compile_once_for_all_lengths(tiny_model_path):
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)  # noqa: E731
    eager, compiled = load(), load()
    assert compile_blocks(compiled) == compiled.config.num_hidden_layers
    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(0)
    for lengths in ([40, 30, 26], [50, 47], [7, 80, 13]):  # packed rows of 96, 97 and 100 tokens
        S = sum(lengths)
        ids = torch.randint(0, 1000, (2, S), generator=g)
        pos = torch.cat([torch.arange(n) for n in lengths])[None].expand(2, S)
        (la, ga), (lb, gb) = nll_and_grads(eager, ids, pos), nll_and_grads(compiled, ids, pos)
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
        scale = max(g.abs().max().item() for g in ga.values())
        for n in ga:
            assert (ga[n] - gb[n]).abs().max().item() <= 1e-5 * scale, n
    # every block and every length ran the one dynamic graph: no recompiles
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_a_model_without_block_classes_is_refused():
    from resure_ds.errors import ConfigError

    with pytest.raises(ConfigError, match="names no transformer block class"):
        compile_blocks(torch.nn.Linear(2, 2))
