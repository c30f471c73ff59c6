"""When an invocation stops early: stop_after counted from its start, the time limit, signals."""
import os
import signal
import time

import pytest

from resure_ds.config import ConfigError, load_config, parse_duration
from resure_ds.runtime.stop import EXIT_RESUME, StopPolicy


@pytest.mark.parametrize("text,seconds", [("", 0), ("90", 90), ("90s", 90), ("45m", 2700), ("4h", 14400),
                                          ("1:30:00", 5400), ("30:00", 1800), ("1.5h", 5400), (3600, 3600)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


def test_bad_time_limit_is_a_config_error():
    with pytest.raises(ConfigError, match="train.time_limit: cannot read 'soon'"):
        load_config(None, ["train.time_limit=soon"])


def test_stop_after_counts_from_where_the_invocation_started():
    p = StopPolicy(stop_after=2, time_limit_s=0)
    assert [p.end_step(s, 6) for s in (0, 2, 4, 5)] == [2, 4, 6, 6]
    assert StopPolicy(0, 0).end_step(3, 6) == 6


def test_time_limit_keeps_room_for_a_step_and_a_save():
    t0 = time.monotonic()
    p = StopPolicy(0, time_limit_s=100, started=t0 - 50)
    p.slowest_step, p.slowest_save = 10, 20
    assert not p.out_of_time()  # 50 s used + 2 x 10 + 20 = 90 < 100
    p.slowest_step = 16
    assert p.out_of_time()  # 50 + 32 + 20 >= 100
    assert not StopPolicy(0, 0, started=t0 - 1e6).out_of_time()  # no limit


def test_signals_are_recorded_not_fatal():
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        p = StopPolicy(0, 0)
        p.install()
        assert p.local_request() == {"stop_signal": 0.0, "stop_time": 0.0}
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert p.signalled == "SIGUSR1" and p.local_request()["stop_signal"] == 1.0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert EXIT_RESUME == 75


def test_steps_that_train_no_token_stop_the_run_like_non_finite_ones():
    """data.max_length=1 under split trained nothing and exited 0 with an export; now three steps of no
    trained token stop the run with the reason, as three non-finite steps do."""
    from resure_ds.errors import TrainingError
    from resure_ds.runtime.stop import Divergence

    empty = {"loss": 0.0, "skipped_step": False, "turns": 0, "trained_tokens": 0, "grad_norm": 0.0,
             "nonfinite_turns": 0}
    d = Divergence(3, 1e-4)
    d.check(1, empty)
    d.check(2, empty)
    with pytest.raises(TrainingError, match="3 consecutive optimizer steps \\(1-3\\) trained no token"):
        d.check(3, empty)
    d = Divergence(3, 1e-4)
    for step in (1, 2):
        d.check(step, {**empty, "loss": float("nan"), "trained_tokens": 10})
    with pytest.raises(TrainingError, match="the run diverged: 3 consecutive"):
        d.check(3, empty)  # a streak that trained tokens, then none: the diverged message
    d = Divergence(3, 1e-4)
    d.check(1, empty)
    d.check(2, {**empty, "turns": 5, "trained_tokens": 40})  # a good step ends the streak
    assert d.healthy


@pytest.mark.parametrize("override,match", [("train.seed=-1", "train.seed: must be in \\[0, 2\\^32\\)"),
                                            ("dist.timeout=100000000000000000000", "dist.timeout: at most 604800"),
                                            ("train.time_limit=nan", "train.time_limit: must be a finite number")])
def test_numbers_that_would_fail_inside_a_rank_are_refused_before_it_starts(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_a_stop_while_the_rank_imports_is_recorded_for_the_policy():
    """resure_ds/train.py's first act, run as a program: a SIGUSR1 before StopPolicy.install (its
    imports take seconds) is recorded, not the default action (death), and the policy has it. In a
    process of its own: the handlers and the record are process-wide."""
    import subprocess
    import sys

    code = ("import os, signal, time, sys; from resure_ds.runtime import stop; stop.record_early(); "
            "os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.05); p = stop.StopPolicy(0, 0); p.install(); "
            "print(p.signalled, p.asked_at_start())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "RESURE_STOP_FILE"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["SIGUSR1", "True"]
