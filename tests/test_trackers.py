"""output.report_to: TensorBoard, wandb (offline) and MLflow (a local SQLite store), each read
back after a real run and its resume."""
import glob
import json
import os

import pytest

from resure_ds.config import ConfigError, load_config
from resure_ds.trackers import names, scalars
from tests.e2e_common import launch, metrics


def test_scalars_flatten_depth_lists_and_drop_nan():
    row = {"step": 3, "loss": 2.5, "stopped": False, "bucket_mean": [1.0, float("nan"), 2.0], "note": "x"}
    assert scalars(row) == {"loss": 2.5, "bucket_mean/0": 1.0, "bucket_mean/2": 2.0}
    assert names("none") == [] and names("wandb") == ["wandb"] and names(["tensorboard", "mlflow"]) == [
        "tensorboard", "mlflow"]


def test_unknown_or_missing_tracker_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        load_config(None, ["output.report_to=[tensorboard, comet]"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(ConfigError, match="pip install wandb"):
        load_config(None, ["output.report_to=wandb"])


@pytest.mark.slow
def test_every_tracker_logs_the_run_and_its_resume(tmp_path, tiny_model_path):
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["recipes/default.yaml", f"model.path={tiny_model_path}", "output.report_to=[tensorboard,wandb,mlflow]",
            "output.project=trk", "data.max_length=64", "train.micro_batch_size=2", "train.log_every=1",
            "checkpoint.every=2", "checkpoint.export=false", "output.report=false", "output.plot=false",
            f"output.dir={tmp_path}", "output.name=t"]
    env = {"NUM_PROCS": "1", "WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": ""}
    launch("train.sh", [*args, "train.max_steps=2"], extra_env=env)
    launch("train.sh", [*args, "train.max_steps=4"], extra_env=env)  # resumes at step 2
    run = os.path.join(tmp_path, "t")
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    losses = [r["loss"] for r in rows]

    ev = EventAccumulator(os.path.join(run, "tensorboard"))
    ev.Reload()
    tb = {e.step: e.value for e in ev.Scalars("loss")}
    assert sorted(tb) == [1, 2, 3, 4] and [tb[s] for s in (1, 2, 3, 4)] == pytest.approx(losses, rel=1e-6)

    mlflow.set_tracking_uri(f"sqlite:///{run}/mlflow.db")
    client = mlflow.tracking.MlflowClient()
    with open(os.path.join(run, ".mlflow_run_id"), encoding="utf-8") as f:
        rid = f.read().strip()
    hist = sorted((m.step, m.value) for m in client.get_metric_history(rid, "loss"))
    assert [s for s, _ in hist] == [1, 2, 3, 4]  # one MLflow run across the resume
    assert [v for _, v in hist] == pytest.approx(losses, rel=1e-6)
    assert client.get_run(rid).data.params["model.lora.rank"] == "0"
    assert client.get_experiment(client.get_run(rid).info.experiment_id).name == "trk"

    with open(os.path.join(run, ".wandb_run_id"), encoding="utf-8") as f:
        wid = f.read().strip()
    files = glob.glob(os.path.join(run, "wandb", f"offline-run-*-{wid}", f"run-{wid}.wandb"))
    assert len(files) == 2  # the first start and the resume, both under the same run id
    logged = b"".join(open(p, "rb").read() for p in files)
    for r in rows:  # every step's loss, as wandb writes history values (JSON text)
        assert json.dumps(r["loss"]).encode() in logged
    assert b"mean_weight" in logged and b"bucket_mean/0" in logged
