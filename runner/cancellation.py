"""SIGTERM, and the one way a cancelled runner ends: an error event, nothing on disk, exit 5.

The handler records the request and raises `Cancelled` (a BaseException, so library code's
`except Exception` cannot swallow it) in the main thread, wherever it is: loading, encoding,
waiting for a generation thread. The stack unwinds through the runner's own cleanup (partial files
removed), and `end_cancelled` then leaves with os._exit: ACE-Step generates in daemon threads,
and an interpreter shutting down under a thread that is still inside torch aborts
("terminate called without an active exception") instead of exiting 5. Code that calls into a
library which might catch everything checks `raise_if_requested()` once the call returns.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import NoReturn

from runner.events import EXIT_CANCELLED, Cancelled, EventStream, RunnerError

_requested = threading.Event()


def _on_sigterm(_signum, _frame) -> None:
    if _requested.is_set():
        return  # already unwinding: a second SIGTERM must not interrupt the cleanup
    _requested.set()
    raise Cancelled()


def install() -> None:
    """Make SIGTERM cancel the run (main thread only, as Python requires)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def requested() -> bool:
    return _requested.is_set()


def raise_if_requested() -> None:
    """After a library call that may have caught the Cancelled raised inside it."""
    if _requested.is_set():
        raise Cancelled()


def clear() -> None:
    """Forget a handled cancel (a test that cancelled in-process; a runner process never goes on)."""
    _requested.clear()


def cancelled_error() -> RunnerError:
    return RunnerError("cancelled", "The job was cancelled; nothing was written.", EXIT_CANCELLED, retryable=True)


def end_cancelled(events: EventStream) -> NoReturn:
    """Emit the error event, flush both streams and leave at once with exit 5, threads or not."""
    try:
        events.error(cancelled_error())
    finally:
        for stream in (sys.stderr, sys.__stderr__):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(EXIT_CANCELLED)
