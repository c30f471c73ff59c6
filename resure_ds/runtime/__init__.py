"""The training runtime: DeepSpeed's engine around the model, attention, checkpoints, metrics.

Importing it defers MLflow's import (resure_ds/runtime/deferred.py), before any of its modules
imports DeepSpeed."""
from resure_ds.runtime.deferred import defer_all

defer_all()
