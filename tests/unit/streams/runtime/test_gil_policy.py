"""The serve processes' GIL switch interval (streams/runtime/gil_policy.py)."""

from __future__ import annotations

import sys

from streams.runtime.gil_policy import SERVE_SWITCH_INTERVAL_S, favour_the_event_loop


def test_the_switch_interval_is_shortened_and_the_previous_one_returned() -> None:
    original = sys.getswitchinterval()
    try:
        assert favour_the_event_loop() == original
        assert sys.getswitchinterval() == SERVE_SWITCH_INTERVAL_S < original
    finally:
        sys.setswitchinterval(original)
