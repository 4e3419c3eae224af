"""StopSignals: the first SIGINT / SIGTERM asks the run to stop after its iteration; a second exits
at once without a traceback, also while the workers shut down after the run left its loop."""

from __future__ import annotations

import os
import signal
import time

import pytest

from rlplat.loops.skeleton import StopSignals


class Restored(Exception):
    """Raised by the handlers the test installs first, should StopSignals hand a signal back to them."""


def _outer_handler(signum: int, frame: object) -> None:
    raise Restored(signal.Signals(signum).name)


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.2)  # the handler runs in the main thread between bytecodes


def test_a_second_signal_during_shutdown_exits_at_once_and_without_a_signal_handlers_are_restored(capsys):
    previous = {sig: signal.signal(sig, _outer_handler) for sig in StopSignals.SIGNALS}
    try:
        with StopSignals() as stop:
            pass
        assert stop.signum is None
        assert all(signal.getsignal(sig) is _outer_handler for sig in StopSignals.SIGNALS)  # restored

        with StopSignals() as stop:
            _deliver(signal.SIGINT)
            assert stop.signum == signal.SIGINT  # the first: finish the iteration, checkpoint
        assert "SIGINT: finishing this iteration" in capsys.readouterr().err
        # The run has left its loop and shuts its workers down: a second signal still exits at once
        # (handed back to the outer handler, it would have raised Restored: a traceback in a real run).
        with pytest.raises(SystemExit) as exited:
            _deliver(signal.SIGTERM)
        assert exited.value.code == 128 + signal.SIGTERM
        assert "SIGTERM again: exiting at once" in capsys.readouterr().err
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
