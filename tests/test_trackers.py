"""output.report_to: TensorBoard, wandb (offline) and MLflow (a local SQLite store), each read
back: here for the trackers themselves across a resume, in tests/test_e2e.py for a real run."""
import glob
import json
import os

import pytest

from resure_ds.config import ConfigError, load_config
from resure_ds.config.parse import tracker_names as names
from resure_ds.runtime.trackers import open_trackers, scalars


def read_trackers(run: str, steps: list[int]) -> tuple[dict[str, list[float]], bytes]:
    """The loss TensorBoard and MLflow hold for `steps` of the run in `run` (its event files; its
    MLflow store, by the run folder's run id), and the bytes of wandb's offline run files."""
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(os.path.join(run, "tensorboard"))
    ev.Reload()
    tb = {e.step: e.value for e in ev.Scalars("loss")}
    assert sorted(tb) == steps
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{run}/mlflow.db")
    with open(os.path.join(run, ".mlflow_run_id"), encoding="utf-8") as f:
        rid = f.read().strip()
    hist = sorted((m.step, m.value) for m in client.get_metric_history(rid, "loss"))
    assert [s for s, _ in hist] == steps  # one MLflow run, also across a resume
    # ended by the tracker before the rank left (it leaves without Python's teardown: resure_ds/train.py)
    assert client.get_run(rid).info.status == "FINISHED"
    with open(os.path.join(run, ".wandb_run_id"), encoding="utf-8") as f:
        wid = f.read().strip()
    files = glob.glob(os.path.join(run, "wandb", f"offline-run-*-{wid}", f"run-{wid}.wandb"))
    assert files  # one offline run folder per start, all under the same run id
    raw = b"".join(open(p, "rb").read() for p in files)
    assert b"mean_weight" in raw and b"bucket_mean/0" in raw
    return {"tensorboard": [tb[s] for s in steps], "mlflow": [v for _, v in hist]}, raw


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
    from resure_ds.runtime.trackers import check_installed

    check_installed("tensorboard")
    with pytest.raises(ConfigError, match="pip install wandb"):  # checked where trackers are, at the run's start
        check_installed(load_config(None, ["output.report_to=wandb"]).output.report_to)


def test_every_tracker_logs_a_run_and_its_resume_into_one_tracker_run(tmp_path, monkeypatch):
    """What MetricsLogger does at a start (step 0) and at a resume (step 2): the same tracker run
    goes on, and each holds every step's values once."""
    import mlflow

    from resure_ds.config import Config, to_dict

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run, config = str(tmp_path), to_dict(Config())
    rows = [{"step": s, "loss": 3.0 / s + 0.0123456789, "mean_weight": 0.9, "bucket_mean": [1.0 + s, float("nan")]}
            for s in (1, 2, 3, 4)]
    for start, part in ((0, rows[:2]), (2, rows[2:])):
        trackers = open_trackers(["tensorboard", "wandb", "mlflow"], run, start, config, "trk", "t")
        for r in part:
            for t in trackers:
                t.log(scalars(r), r["step"])
        for t in trackers:
            t.close()
    got, raw = read_trackers(run, [1, 2, 3, 4])
    assert got["tensorboard"] == pytest.approx([r["loss"] for r in rows])
    assert got["mlflow"] == pytest.approx([r["loss"] for r in rows])
    # wandb's offline files are its binary protocol: every logged value is in them as its JSON text
    assert all(json.dumps(r["loss"]).encode() in raw for r in rows)
    assert len(glob.glob(os.path.join(run, "wandb", "offline-run-*"))) == 2  # the start and the resume
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{run}/mlflow.db")
    rid = open(os.path.join(run, ".mlflow_run_id"), encoding="utf-8").read().strip()
    assert client.get_run(rid).data.params["model.lora.rank"] == "0"
    assert client.get_experiment(client.get_run(rid).info.experiment_id).name == "trk"
    # a fresh start in the same folder is a new tracker run
    open_trackers(["mlflow"], run, 0, config, "trk", "t")[0].close()
    assert open(os.path.join(run, ".mlflow_run_id"), encoding="utf-8").read().strip() != rid
