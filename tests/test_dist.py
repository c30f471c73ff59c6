"""resure_ds.dist on real gloo process groups: reductions by name, gathers in rank order."""
import pytest
import torch

from resure_ds import dist
from tests.dist import run_ranks


def _named(rank, world):
    # the same keys, inserted in a different order on each rank
    items = [("a", 1.0 + rank), ("b", torch.tensor(10.0 * (rank + 1), dtype=torch.float64)), ("c", rank)]
    d = dict(items if rank == 0 else reversed(items))
    return (dist.all_reduce_dict(d), dist.all_reduce_dict({"x": rank, "y": -rank}, op="max"),
            dist.all_gather_cat(torch.full((2, 3), float(rank))), dist.rank(), dist.world())


def test_reductions_by_name_and_gather_in_rank_order(tmp_path):
    for summed, maxed, gathered, rank, world in run_ranks(_named, 2, (), str(tmp_path)):
        assert world == 2 and rank in (0, 1)
        assert summed == {"a": 3.0, "b": 30.0, "c": 1.0}
        assert maxed == {"x": 1.0, "y": 0.0}
        assert gathered.shape == (4, 3) and gathered[:2].eq(0).all() and gathered[2:].eq(1).all()


def test_without_a_process_group_every_call_is_the_identity():
    assert dist.world() == 1 and dist.rank() == 0
    assert dist.all_reduce_dict({"b": 2, "a": torch.tensor(1.5)}) == {"a": 1.5, "b": 2.0}
    t = torch.arange(3.0)
    assert torch.equal(dist.all_reduce_sum(t), t) and torch.equal(dist.all_gather_cat(t), t)
    dist.barrier()


def test_dist_imports_only_torch():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(dist))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= {"__future__", "sys", "torch"}, names


@pytest.mark.parametrize("module", ["stats.welford", "stats.histogram", "stats.method", "train", "step",
                                    "eval.validation", "runtime.engine", "runtime.checkpoint"])
def test_collectives_go_through_dist(module):
    """No module but dist.py touches torch.distributed (DeepSpeed makes its own calls inside)."""
    import importlib
    import inspect

    src = inspect.getsource(importlib.import_module(f"resure_ds.{module}"))
    assert "torch.distributed" not in src and "dist.all_reduce(" not in src and "dist.all_gather(" not in src
