"""A stop signal inside `stopping_cleanly_on_signals`: child processes terminated, `Stopped` raised, the
handlers before it put back after the block."""

import multiprocessing
import os
import signal
import time

import pytest

from pipelines.stopping import (
    STOP_SIGNALS,
    Stopped,
    img2dataset_stops_cleanly,
    keep_sigterm_handler,
    stop,
    stopping_cleanly_on_signals,
)


@pytest.mark.parametrize("signal_number", STOP_SIGNALS, ids=lambda number: signal.Signals(number).name)
def test_a_stop_signal_terminates_the_children_and_raises_stopped(signal_number: int) -> None:
    before = signal.getsignal(signal_number)
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(600,))
    with pytest.raises(Stopped) as stopped, stopping_cleanly_on_signals():
        child.start()
        os.kill(os.getpid(), signal_number)
    child.join(timeout=30)
    assert child.exitcode == -signal.SIGTERM, "the child was terminated, not left sleeping"
    assert stopped.value.code == 128 + signal_number
    assert stopped.value.signal_name == signal.Signals(signal_number).name
    assert signal.getsignal(signal_number) is before


def test_a_library_that_installs_its_own_sigterm_handler_does_not_replace_the_one_before() -> None:
    def exit_only(signal_number: int, frame) -> None:  # what ray.init installs
        raise SystemExit(signal_number)

    with stopping_cleanly_on_signals():
        keep_sigterm_handler(lambda: signal.signal(signal.SIGTERM, exit_only))
        assert signal.getsignal(signal.SIGTERM) is stop
    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        keep_sigterm_handler(lambda: signal.signal(signal.SIGTERM, exit_only))
        assert signal.getsignal(signal.SIGTERM) is exit_only, "without a handler set in Python, the library's stays"
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_ctrl_c_during_img2dataset_is_a_stop_and_its_handler_goes_with_it() -> None:
    def exit_with_0(signal_number: int, frame) -> None:  # what img2dataset's download installs on SIGINT
        raise SystemExit(0)

    with stopping_cleanly_on_signals():
        with pytest.raises(Stopped) as stopped, img2dataset_stops_cleanly():
            signal.signal(signal.SIGINT, exit_with_0)
            os.kill(os.getpid(), signal.SIGINT)
        assert stopped.value.code == 128 + signal.SIGINT
        assert signal.getsignal(signal.SIGINT) is stop
        with pytest.raises(Stopped) as stopped, img2dataset_stops_cleanly():  # another signal stays itself
            os.kill(os.getpid(), signal.SIGTERM)
        assert stopped.value.code == 128 + signal.SIGTERM
