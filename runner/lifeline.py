"""A runner must not outlive the service that started it: two watches that end it when the service goes.

1. The parent-death signal (Linux `prctl(PR_SET_PDEATHSIG, SIGTERM)`): the kernel sends SIGTERM
   when the parent dies, even by SIGKILL. It fires when the parent *thread* that forked this
   process exits, which is why the service starts every runner from its one long-lived worker
   thread.
2. The service's end of stdin: a keep-warm runner reads its jobs there, but nobody reads while a
   job runs, so a closed pipe (the service died, or gave the runner up) would go unnoticed until
   the job ended. A daemon thread polls file descriptor 0 for POLLHUP during jobs, and watches
   for a change of parent (re-parented: the parent is gone) at all times.

Either way the runner gets SIGTERM, its one way of being cancelled: it stops at once, writes
nothing and exits 5. What escapes both (a runner stuck in a C call that ignores signals) is caught
by the service's reconciliation at its next start, which kills the process group. Standard
library only: the fake runner of the tests uses the same watches.
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import threading

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel for `sig` when the parent (thread) dies; False where that is not possible."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class ServiceWatch:
    """Sends this process SIGTERM when stdin hangs up during a job, or when the parent changes."""

    def __init__(self, fd: int = 0, interval_s: float = 0.2):
        self.fd = fd
        self.interval_s = interval_s
        self.parent = os.getppid()
        self.fired: str | None = None  # why it sent SIGTERM, for the log
        self._in_job = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="service-watch", daemon=True)

    def start(self) -> "ServiceWatch":
        self._thread.start()  # a service gone before this point left stdin closed: serve reads its end
        return self

    def job_started(self) -> None:
        self._in_job.set()

    def job_ended(self) -> None:
        self._in_job.clear()

    def _watch(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while self.fired is None:
            if os.getppid() != self.parent:
                self._fire("the service that started the runner is gone")
                return
            if not self._in_job.wait(self.interval_s):
                continue  # between jobs the serve loop reads stdin itself and sees its end
            try:
                ready = poller.poll(int(self.interval_s * 1000))
            except InterruptedError:
                continue
            events = ready[0][1] if ready else 0
            if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL) and self._in_job.is_set():
                self._fire("the service closed the runner's stdin during a job")
                return
            if events:  # data waiting (the next job line): nothing to do until it is read
                threading.Event().wait(self.interval_s)

    def _fire(self, reason: str) -> None:
        self.fired = reason
        os.kill(os.getpid(), signal.SIGTERM)


def install() -> ServiceWatch:
    """Both watches, as early as possible in a runner that serves the web service."""
    die_with_parent(signal.SIGTERM)
    return ServiceWatch().start()
