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
