"""train.profile_steps (runtime/profile.py) in process: the span a run reaches is profiled, rank 0 only."""
import torch

from resure_ds.runtime.profile import StepProfiler


def run(profiler, steps):
    for step in steps:
        profiler.before(step)
        torch.randn(64, 64) @ torch.randn(64, 64)
        profiler.after(step)
    profiler.finish(steps[-1])


def test_a_run_resumed_inside_the_span_profiles_the_rest_and_other_ranks_nothing(tmp_path):
    run(StepProfiler("3-5", str(tmp_path), 0), range(4, 8))  # resumed at step 3: steps 4 and 5 are left
    text = (tmp_path / "profile.txt").read_text()
    assert text.startswith("steps 4-5: ") and "aten::mm" in text and (tmp_path / "profile.json").exists()
    other = tmp_path / "rank1"
    other.mkdir()
    run(StepProfiler("3-5", str(other), 1), range(1, 8))
    assert not list(other.iterdir())


def test_a_run_that_stops_inside_the_span_writes_what_it_profiled(tmp_path):
    run(StepProfiler("2-9", str(tmp_path), 0), range(1, 5))
    assert (tmp_path / "profile.txt").read_text().startswith("steps 2-4: ")
