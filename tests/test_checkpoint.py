"""Publish-then-rotate and the checks on resume, on real folders (DeepSpeed's files stood in for
by files of the same names: the protocol looks only at names and sizes)."""
import dataclasses
import json
import os

import pytest

from resure_ds.runtime import checkpoint as ckpt

PROGRESS = ckpt.Progress(step=0, cursor={}, world_size=2, global_batch=4, data=[], method={"welford": {}})


def stage(ckpt_dir, step, world=2, skip_rank=None):
    tag = f"step{step:07d}"
    folder = os.path.join(ckpt_dir, ckpt.staging(tag))
    os.makedirs(folder, exist_ok=True)
    for r in range(world):
        with open(os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"), "wb") as f:
            f.write(b"x" * (100 + r))
        if r != skip_rank:
            ckpt.write_rank_state(ckpt_dir, ckpt.staging(tag), r, {"rng": None})
    return tag


def test_publish_verify_rotate(tmp_path):
    d = str(tmp_path)
    for step in (2, 4, 6):
        tag = stage(d, step)
        assert ckpt.find(d, "auto") is None or ckpt.find(d, "auto").tag != tag  # staged: never resumed
        ckpt.publish(d, tag, dataclasses.replace(PROGRESS, step=step), world=2)
        ckpt.rotate(d, keep_last=2)
    assert sorted(os.listdir(d)) == ["latest", "step0000004", "step0000006"]
    found = ckpt.find(d, "auto")
    assert found.tag == "step0000006" and found.progress.step == 6
    assert found.files["zero_pp_rank_1_mp_rank_00_optim_states.pt"] == 101
    with open(os.path.join(d, "latest"), encoding="utf-8") as f:
        assert f.read() == "step0000006"


def test_incomplete_stage_is_not_published(tmp_path):
    d = str(tmp_path)
    ckpt.publish(d, stage(d, 2), PROGRESS, world=2)
    tag = stage(d, 4, skip_rank=1)
    with pytest.raises(RuntimeError, match="rank_state_00001.json missing"):
        ckpt.publish(d, tag, PROGRESS, world=2)
    assert ckpt.find(d, "auto").tag == "step0000002"
    ckpt.clear_staging(d)
    assert sorted(os.listdir(d)) == ["latest", "step0000002"]


def test_damaged_or_foreign_checkpoints_are_named(tmp_path):
    d = str(tmp_path)
    ckpt.publish(d, stage(d, 2), PROGRESS, world=2)
    victim = os.path.join(d, "step0000002", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with open(victim, "wb") as f:
        f.write(b"x")
    with pytest.raises(FileNotFoundError, match="is damaged: zero_pp_rank_0_mp_rank_00_optim_states.pt has 1 "
                                                "bytes, 100 were written"):
        ckpt.find(d, "auto")
    os.remove(victim)
    with pytest.raises(FileNotFoundError, match="optim_states.pt missing"):
        ckpt.find(d, os.path.join(d, "step0000002"))
    with open(os.path.join(d, "step0000002", "progress.json"), "w", encoding="utf-8") as f:
        json.dump({"step": 2}, f)
    with pytest.raises(FileNotFoundError, match="lacks"):
        ckpt.find(d, "auto")
    with open(os.path.join(d, "step0000002", "progress.json"), "w", encoding="utf-8") as f:
        f.write("{not json")
    with pytest.raises(FileNotFoundError, match="cannot be read"):
        ckpt.find(d, "auto")


def test_resume_state_is_json_only(tmp_path):
    """Nothing of ours is a pickle: a checkpoint folder from elsewhere cannot run code through it."""
    import inspect

    src = inspect.getsource(ckpt)
    assert "torch.load" not in src and "pickle" not in src


def test_a_new_run_in_a_used_folder_keeps_what_it_publishes_and_resumes_its_own_latest(tmp_path):
    """An old run left step 6; a new run (checkpoint.resume=none) publishes steps 1..3 with keep_last=1.
    Rotation goes by publish order and never removes what `latest` names, and resume=auto takes
    exactly `latest`: the new run's step 3, not the old run's higher-numbered step 6."""
    d = str(tmp_path)
    ckpt.publish(d, stage(d, 6), dataclasses.replace(PROGRESS, step=6), world=2)
    for step in (1, 2, 3):
        ckpt.publish(d, stage(d, step), dataclasses.replace(PROGRESS, step=step), world=2)
        ckpt.rotate(d, keep_last=1)
        assert sorted(os.listdir(d)) == ["latest", f"step{step:07d}"]
    assert ckpt.find(d, "auto").progress.step == 3


def test_latest_naming_a_missing_checkpoint_is_an_error_not_another_checkpoint(tmp_path):
    d = str(tmp_path)
    ckpt.publish(d, stage(d, 2), PROGRESS, world=2)
    ckpt.publish(d, stage(d, 4), dataclasses.replace(PROGRESS, step=4), world=2)
    import shutil

    shutil.rmtree(os.path.join(d, "step0000004"))
    with pytest.raises(FileNotFoundError, match="latest names step0000004, which is not a published checkpoint"):
        ckpt.find(d, "auto")


def test_a_failed_write_of_a_checkpoint_is_an_oserror_naming_the_folder():
    """torch.save reports a full disk as RuntimeError ('unexpected pos'): the run's clear message about
    output.dir is printed for OSError, so the save path turns whatever it gets into one."""
    with pytest.raises(OSError, match="writing /x/step0000004.saving failed \\(RuntimeError: \\[enforce fail at "
                                      "inline_container.cc\\] unexpected pos 64 vs 0\\)"):
        with ckpt.write_errors("/x/step0000004.saving"):
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 64 vs 0\nmore lines")
    with pytest.raises(OSError, match="No space left"):  # an OSError stays itself
        with ckpt.write_errors("/x"):
            raise OSError(28, "No space left on device")
