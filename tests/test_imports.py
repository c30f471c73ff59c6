"""The package's import graph: light core modules, no circles, every arrow pointing down a layer
(docs/architecture.md), and imports of our own modules at module top only."""
import ast
import os
import pathlib
import subprocess
import sys

from tests.conftest import ROOT

PKG = pathlib.Path(ROOT) / "resure_ds"

# The layers, lowest first; a module may import only from its own part or from a lower layer.
LAYER = {"errors": 0, "dist": 0, "files": 1, "config": 1, "models": 2, "data": 3, "stats": 4, "runtime": 4, "eval": 6,
         "report": 6,
         "step": 7, "train": 8, "cli": 8, "node": 8, "plan": 8, "testing": 8, "__init__": 8}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """(imported resure_ds module, at module top?) for every import of our own modules."""
    name = module_name(path)
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if not src.startswith("resure_ds"):
                continue
            for alias in node.names:  # `from pkg import module` imports the module
                sub = f"{src}.{alias.name}"
                is_mod = (PKG.parent / (sub.replace(".", "/") + ".py")).exists() or \
                    (PKG.parent / sub.replace(".", "/") / "__init__.py").exists()
                out.append((sub if is_mod else src, id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names if a.name.startswith("resure_ds")]
    return out


def graph() -> dict[str, list[tuple[str, bool]]]:
    return {module_name(p): imports(p) for p in PKG.rglob("*.py")}


def part(mod: str) -> str:
    return mod.split(".")[1] if "." in mod else "__init__"


def find_cycles(g: dict[str, list[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in g.get(m, []):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d in g and not state.get(d):
                visit(d, stack + [d])
        state[m] = 2

    for m in g:
        if not state.get(m):
            visit(m, [m])
    return cycles


def test_no_import_circles():
    g = {m: sorted({d for d, _ in deps if d != m}) for m, deps in graph().items()}
    assert not find_cycles(g), find_cycles(g)
    # the walk finds the circle this package once had (records -> shards -> render -> records)
    assert find_cycles({"records": ["shards"], "shards": ["render"], "render": ["records"]}) == \
        [["records", "shards", "render", "records"]]


def test_every_import_points_down_a_layer():
    up = [(m, d) for m, deps in graph().items() for d, _ in deps
          if part(m) != part(d) and LAYER[part(d)] >= LAYER[part(m)]]
    assert not up, up
    assert set(map(part, graph())) <= set(LAYER), "a new part of the package needs its layer here"


def test_our_modules_are_imported_at_module_top():
    lazy = [(m, d) for m, deps in graph().items() for d, top in deps if not top and not m.endswith("__main__")]
    assert not lazy, lazy


def test_the_graph_reads_relative_and_module_imports():
    g = graph()
    assert ("resure_ds.stats.turns", True) in g["resure_ds.eval.validation"]  # from ..stats.turns import
    assert ("resure_ds.dist", True) in g["resure_ds.stats.welford"]   # from .. import dist


def test_the_statistics_import_no_runtime():
    """stats/ reaches its collectives through resure_ds.dist (torch only): importing it runs none of the
    runtime's import-time hooks (runtime/__init__.py puts an MLflow stand-in into sys.modules)."""
    code = ("import sys, resure_ds.stats.method, resure_ds.stats.sources, resure_ds.stats.weighting; "
            "bad = [m for m in sys.modules if m.startswith('resure_ds.runtime') or m == 'mlflow']; "
            "assert not bad, bad; print('clean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr


def test_core_modules_do_not_import_deepspeed():
    # the loader modules run in every background worker: they stay light too
    code = ("import sys, resure_ds.stats.turns, resure_ds.stats.welford, resure_ds.stats.weighting, "
            "resure_ds.stats.histogram, resure_ds.stats.method, resure_ds.data.loader, resure_ds.data.order, "
            "resure_ds.data.shards, resure_ds.runtime.checkpoint; "
            "bad = [m for m in ('deepspeed', 'transformers') if m in sys.modules]; "
            "assert not bad, bad; print('clean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr


def test_mlflow_is_imported_only_when_used():
    """DeepSpeed imports MLflow at its own import time (1.5 s of CPU a process); the runtime defers
    it (resure_ds/runtime/deferred.py). What reads every module in sys.modules (inspect.getmodule,
    as torch's operator registration does), find_spec and the import statement must not load it;
    an attribute of it must, for DeepSpeed's own reference as for a later import."""
    code = """
import importlib.util, inspect, sys
import resure_ds.runtime.engine, deepspeed.autotuning.autotuner as at, torch
stand_in = sys.modules["mlflow"]
assert type(stand_in).__name__ == "Deferred" and "mlflow.tracking" not in sys.modules, type(stand_in)
import mlflow
assert importlib.util.find_spec("mlflow").origin == stand_in.__file__
inspect.getmodule(torch.nn.Linear)
from transformers.integrations.integration_utils import is_mlflow_available
assert is_mlflow_available() and "mlflow.tracking" not in sys.modules
assert callable(at.mlflow.start_run) and "mlflow.tracking" in sys.modules
assert type(sys.modules["mlflow"]).__name__ == "module" and mlflow.end_run is sys.modules["mlflow"].end_run
from mlflow.tracking import MlflowClient
from resure_ds.runtime import deferred, trackers
sys.modules["mlflow"] = deferred.Deferred("mlflow")  # the tracker loads a stand-in for real
assert trackers._need("mlflow", "mlflow").start_run is at.mlflow.start_run
print("deferred")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "deferred" in out.stdout, out.stderr[-3000:]


def test_a_deferred_module_that_fails_raises_at_every_use(tmp_path):
    (tmp_path / "broken_pkg.py").write_text("raise ImportError('a dependency of broken_pkg is missing')\n")
    (tmp_path / "fine_pkg.py").write_text("VALUE = 7\n")
    code = """
import sys
from resure_ds.runtime import deferred
for name in ("broken_pkg", "fine_pkg", "no_such_module_here"):
    deferred.defer(name)
assert "no_such_module_here" not in sys.modules
stand_in = sys.modules["fine_pkg"]
assert isinstance(stand_in, deferred.Deferred) and stand_in.VALUE == 7 and sys.modules["fine_pkg"] is not stand_in
broken = sys.modules["broken_pkg"]
for _ in range(2):  # the first use and every later one
    try:
        broken.anything
    except ImportError as e:
        assert "dependency of broken_pkg" in str(e)
    else:
        raise AssertionError("no ImportError")
sys.modules["fine_pkg"] = None  # Python's mark of a module that must not import: kept
try:
    deferred.load("fine_pkg")
except ImportError:
    print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
