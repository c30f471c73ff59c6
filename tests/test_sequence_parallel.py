"""train.sequence_parallel (Ulysses through DeepSpeed, resure_ds/runtime/sequence.py) on 2 gloo ranks
of ZeRO-3 against one rank on the same rows: the same per-turn losses, statistics and gradients,
padded and packed; and the mask that keeps packed dialogues apart."""
import os

import pytest
import torch

from tests.dist import run_ranks
from tests.test_grad_equivalence import dialogues

slow = pytest.mark.slow  # real multi-process runs


def worker(rank, world, model_path, sp, packed, run_dir):
    from transformers import AutoTokenizer

    from resure_ds.config import load_config
    from resure_ds.data.collate import collate
    from resure_ds.data.render import Renderer
    from resure_ds.report.audit import AuditLog
    from resure_ds.runtime import engine as ds
    from resure_ds.runtime.sequence import SequenceParallel
    from resure_ds.stats.method import Method
    from resure_ds.stats.turns import shift_targets
    from resure_ds.step import Stepper
    from resure_ds.testing import full_grads

    cfg = load_config(None, [f"model.path={model_path}", "model.dtype=fp32", "train.method=sft",
                             "train.micro_batch_size=4", "train.grad_clip=0", "train.zero_stage=3",
                             f"train.sequence_parallel={sp}"])
    torch.manual_seed(0)
    engine = ds.Engine(cfg, model_path)
    group = SequenceParallel(sp, rank, world)
    group.install(engine.module.config, "sdpa")
    tok = AutoTokenizer.from_pretrained(model_path)
    exs = [Renderer(tok, 96).render(d) for d in dialogues()]
    rows = [exs[:2], exs[2:]] if packed else [[e] for e in exs]  # every rank of the group: the same rows
    batch = collate(rows, tok.pad_token_id, packed=packed)
    stepper = Stepper(cfg, engine, Method(cfg), AuditLog(run_dir, rank), ["test"], rank, group)
    n = stepper.global_token_count([batch])
    turns, _ = stepper.micro_backward(batch, 1, n, {})
    tg = shift_targets(batch["labels"], batch["turn_ids"], batch["doc_ids"])
    local = group.shard(batch, tg)[0]["input_ids"].shape[1] if group.on else None
    return {"grads": full_grads(engine), "n": n, "turns": turns.mean.cpu(), "stats": stepper.method.stats.state,
            "S": batch["input_ids"].shape[1], "local": local}


@slow
@pytest.mark.parametrize("packed", [False, True])
def test_two_way_sequence_parallel_equals_one_rank(tmp_path, tiny_model_path, packed):
    base = run_ranks(worker, 1, (tiny_model_path, 1, packed, str(tmp_path / "a")), str(tmp_path))[0]
    res = run_ranks(worker, 2, (tiny_model_path, 2, packed, str(tmp_path / "b")), str(tmp_path))
    S = base["S"]
    assert all(r["local"] == -(-S // 2) for r in res)  # each rank ran half the row (S odd: padded by one)
    scale = max(g.abs().max().item() for g in base["grads"].values())
    for r in res:
        assert r["n"] == base["n"] > 0
        torch.testing.assert_close(r["turns"], base["turns"], rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(r["stats"], base["stats"], rtol=1e-5, atol=1e-6)
        assert set(r["grads"]) == set(base["grads"])
        for name, g in base["grads"].items():
            assert (r["grads"][name] - g).abs().max().item() <= 1e-5 * max(scale, 1.0), name


@slow
def test_a_sequence_parallel_run_trains_like_the_straight_run_and_resumes_on_one_rank(straight, tiny_model_path):
    """The recipe end to end: 2 ranks as one sequence-parallel group (SP=2, 4 rows a step, packed,
    validation on), stopped after step 3 and resumed on 1 rank without SP: the same steps, turns,
    statistics, losses and validation as the straight run (2 data-parallel ranks of 2 rows)."""
    from tests.e2e_common import COMMON, EXIT_RESUME, audit, launch, metrics

    out = os.path.dirname(straight)
    args = ["recipes/default.yaml", f"model.path={tiny_model_path}", *COMMON, f"output.dir={out}",
            "output.name=sp2", "train.micro_batch_size=4"]
    first = launch("train.sh", [*args, "train.sequence_parallel=2", "train.stop_after=3"], status=EXIT_RESUME)
    assert "sequence parallel 2" in first.stderr and "stopped at step 3 of 6" in first.stderr
    second = launch("train.sh", args, extra_env={"NUM_PROCS": "1"})
    assert "saved on 2 rank(s), now 1" in second.stderr
    a, b = metrics(straight), metrics(os.path.join(out, "sp2"))
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6] and [r["rows_seen"] for r in b] == [4, 8, 12, 16, 20, 24]
    for ra, rb in zip(a, b):
        assert ra["bucket_n"] == rb["bucket_n"] and ra["turns"] == rb["turns"], ra["step"]
        for k in ("loss", "weighted_loss", "mean_weight", "bucket_mean", "bucket_std", "lr", "val_loss",
                  "trained_tokens"):
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6, nan_ok=True), (ra["step"], k)
    key = lambda r: sorted((x["step"], x["dialogue_id"], x["turn"]) for x in audit(r))  # noqa: E731
    assert key(straight) == key(os.path.join(out, "sp2"))  # each turn once: the group's first rank writes it
    assert {x["rank"] for x in audit(os.path.join(out, "sp2")) if x["step"] <= 3} == {0}


def test_what_cannot_be_cut_is_refused_with_the_reason(smollm2_path):
    from transformers import AutoConfig

    from resure_ds.config import ConfigError, load_config
    from resure_ds.runtime.sequence import SequenceParallel

    with pytest.raises(ConfigError, match="train.sequence_parallel=3 must divide the number of ranks \\(2\\)"):
        SequenceParallel(3, 0, 2)
    with pytest.raises(ConfigError, match="9 attention heads and 3 key-value heads"):  # SmolLM2-135M
        SequenceParallel(2, 0, 2).install(AutoConfig.from_pretrained(smollm2_path), "sdpa")
    with pytest.raises(ConfigError, match="eager"):
        load_config(None, ["train.sequence_parallel=2", "model.attn_implementation=eager"])
    with pytest.raises(ConfigError, match="train.sequence_parallel: must be > 0"):
        load_config(None, ["train.sequence_parallel=0"])
