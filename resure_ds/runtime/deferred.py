"""Optional packages that DeepSpeed imports at its own import time, deferred until first used.

DeepSpeed's autotuner runs `import mlflow` whenever MLflow is installed, and MLflow's import
(pandas and its own client) costs seconds of CPU in every process that imports DeepSpeed: each rank, at
every start (docs/performance.md). Deferred, `import mlflow` finds a stand-in in sys.modules, and the first
attribute anyone reads from it (mlflow.start_run, or a submodule's import) imports MLflow for real:
a run that does not report to MLflow never pays for it, one that does pays at the tracker
(resure_ds/runtime/trackers.py). `importlib.util.LazyLoader` cannot do this: the import statement
itself reads the module's `__spec__`, which makes a lazy module load."""
import importlib
import importlib.util
import sys
import types

DEFERRED = ("mlflow",)


class Deferred(types.ModuleType):
    """Stands in sys.modules for a module not yet imported. It holds the module's spec (so
    `importlib.util.find_spec` still answers) and file (what `inspect.getmodule` reads of every
    module in sys.modules, as torch does when it registers an operator); any other attribute
    imports the real module and is read from it."""

    def __getattr__(self, attr: str):
        return getattr(load(self.__name__), attr)


def load(name: str) -> types.ModuleType:
    """The real module behind a stand-in, imported now if it was not yet."""
    if isinstance(sys.modules.get(name), Deferred):
        del sys.modules[name]  # a failed import leaves it out: the next use imports (and raises) again
    return importlib.import_module(name)


def defer(name: str) -> None:
    """Put a stand-in for `name` in sys.modules, if it is installed and not yet imported."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    stand_in = Deferred(name)
    stand_in.__spec__ = spec
    stand_in.__file__ = spec.origin
    sys.modules[name] = stand_in


def defer_all() -> None:
    for name in DEFERRED:
        defer(name)
