"""The conditions a carve's model run runs under: its time limit (a SIGALRM that stops the run wherever it is in
Python code) and the heap frozen out of the garbage collector while it records. It must not record anything."""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import threading
import time
from typing import Any

from tapml.errors import TapmlError


def check_timeout(timeout: float | None) -> None:
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise TapmlError(f"--timeout must be a finite number of seconds > 0 (got {timeout!r})")
    if threading.current_thread() is not threading.main_thread():
        raise TapmlError("a carve with a time limit (--timeout) must run in the main thread: the limit is a "
                         "SIGALRM, which Python handles there only")


class _Expired(BaseException):
    """The time limit is up (a BaseException, as KeyboardInterrupt: a model's `except Exception` must not eat it)."""


class TimeLimit:
    """SIGALRM after `seconds` raises _Expired in the main thread, wherever the run is in Python code; a timer of
    another part of the process that was armed is given back what is left of it."""

    def __init__(self, seconds: float | None):
        self.seconds, self.armed, self.expired = seconds, False, False

    def _fire(self, signum: int, frame: Any) -> None:
        if self.armed:  # a signal delivered just as the limit was lifted is ignored
            self.expired = True
            raise _Expired

    def __enter__(self) -> None:
        if self.seconds is None:
            return
        self.old_handler = signal.signal(signal.SIGALRM, self._fire)
        self.armed, self.started = True, time.monotonic()
        self.old_timer = signal.setitimer(signal.ITIMER_REAL, max(self.seconds, 1e-6))

    def __exit__(self, *exc: object) -> None:
        if self.seconds is None:
            return
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old_handler)
        delay, interval = self.old_timer
        if delay > 0:
            signal.setitimer(signal.ITIMER_REAL, max(delay - (time.monotonic() - self.started), 1e-6), interval)
        if self.expired and exc[0] is None:  # the model caught the expiry and went on: it still ran too long
            raise _Expired


@contextlib.contextmanager
def frozen_heap():
    """Keep the objects that exist before the run (the model, torch, transformers: hundreds of thousands) out of
    the garbage collector's passes while recording, as `gc.freeze` does for forked servers. The samples the
    Recorder keeps are long-lived objects too; with the whole heap in the oldest generation they trigger full
    collections that stall the run for 100-200 ms each. Left alone when the process has frozen objects itself."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
