"""Experiment trackers for the rank-0 step metrics (output.report_to).

tensorboard (the default) writes <run>/tensorboard. wandb and mlflow are optional packages,
imported only when named. Both keep one tracker run per run folder: its id is stored in the
run folder, so a resumed run goes on logging into the same tracker run. Offline by default
where the tracker allows it:
  wandb   the run is written under <run>/wandb; WANDB_MODE decides (offline unless you set it
          to online; `wandb sync <run>/wandb/offline-run-*` uploads it later).
  mlflow  MLFLOW_TRACKING_URI where set, else a SQLite store in the run folder
          (sqlite:///<run>/mlflow.db; view with `mlflow ui --backend-store-uri sqlite:///...`).
Each gets the run's scalars every train.log_every steps (per-depth lists as name/depth) and,
at the start, the flattened config.
"""
from __future__ import annotations

import importlib.util

import os
import uuid

from ..config.parse import tracker_names
from ..errors import ConfigError
from ..files import write_text
from .deferred import load


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics row: scalars as they are, per-depth lists as name/depth (NaN dropped)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, bool) or k == "step":
            continue
        if isinstance(v, (int, float)):
            out[k] = float(v)
        elif isinstance(v, list) and k.startswith(("bucket_", "val_depth_")):
            out.update({f"{k}/{b}": float(x) for b, x in enumerate(v) if isinstance(x, (int, float)) and x == x})
    return out


def _stored_id(run_dir: str, name: str, start_step: int) -> str | None:
    """The id of this run in tracker `name`, kept in the run folder, when resuming (start_step > 0);
    None at a fresh start, which begins a new tracker run."""
    path = os.path.join(run_dir, f".{name}_run_id")
    if start_step > 0 and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return None


def _store_id(run_dir: str, name: str, rid: str) -> str:
    write_text(os.path.join(run_dir, f".{name}_run_id"), rid)
    return rid


def _need(module: str, tracker: str):
    try:
        return load(module)  # imported now, also where its import was deferred (deferred.py)
    except ImportError:
        raise ConfigError(f"output.report_to names {tracker}, but the {tracker} package is not installed: "
                          f"pip install {tracker} (or drop it from output.report_to)") from None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]  # mlflow caps a parameter's value
    return out


class TensorBoard:
    def __init__(self, run_dir: str, start_step: int, **_):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1)

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)

    def close(self) -> None:
        self.w.close()


class Wandb:
    def __init__(self, run_dir: str, start_step: int, config: dict, project: str, name: str):
        wandb = _need("wandb", "wandb")
        os.environ.setdefault("WANDB_MODE", "offline")
        rid = _stored_id(run_dir, "wandb", start_step) or _store_id(run_dir, "wandb", uuid.uuid4().hex)
        self.run = wandb.init(project=project, name=name, dir=run_dir, config=config, id=rid, resume="allow")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Mlflow:
    def __init__(self, run_dir: str, start_step: int, config: dict, project: str, name: str):
        mlflow = _need("mlflow", "mlflow")
        self.mlflow = mlflow
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI")
                                or f"sqlite:///{os.path.abspath(os.path.join(run_dir, 'mlflow.db'))}")
        mlflow.set_experiment(project)
        rid = _stored_id(run_dir, "mlflow", start_step)
        if rid is not None:
            self.run = mlflow.start_run(run_id=rid)
        else:  # MLflow makes the id
            self.run = mlflow.start_run(run_name=name)
            _store_id(run_dir, "mlflow", self.run.info.run_id)
            mlflow.log_params(_flat(config))

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def check_installed(report_to) -> None:
    """Before the run starts: every tracker output.report_to names is installed (tensorboard ships with
    the recipe's requirements), or one error naming the package to install."""
    missing = [t for t in tracker_names(report_to) if t != "tensorboard" and importlib.util.find_spec(t) is None]
    if missing:
        raise ConfigError(f"output.report_to: {', '.join(missing)} is not installed (pip install {' '.join(missing)}), "
                          "or drop it from output.report_to")


def open_trackers(report_to, run_dir: str, start_step: int, config: dict, project: str, name: str) -> list:
    kinds = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}
    return [kinds[n](run_dir, start_step, config=config, project=project, name=name) for n in tracker_names(report_to)]
