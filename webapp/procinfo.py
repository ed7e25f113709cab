"""Which process is which, across restarts: a pid plus its start time, read from /proc.

A pid alone is reused by the kernel; a pid with the start time the kernel gave it (field 22 of
/proc/<pid>/stat, clock ticks since boot) names one process for good. The lease journal and the
data-folder lock record these identities so that a later worker can tell a live holder or an
orphaned runner from a stranger that happens to have the same pid. Linux only, like the service.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessId:
    pid: int
    start: int  # clock ticks since boot

    def as_dict(self) -> dict:
        return {"pid": self.pid, "start": self.start}

    @classmethod
    def from_dict(cls, data) -> "ProcessId | None":
        try:
            return cls(int(data["pid"]), int(data["start"]))
        except (KeyError, TypeError, ValueError):
            return None


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    return text.rsplit(")", 1)[1].split()


def identity(pid: int) -> ProcessId | None:
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return ProcessId(pid, int(fields[19]))  # starttime is field 22; fields[0] is field 3


def me() -> ProcessId:
    ident = identity(os.getpid())
    assert ident is not None
    return ident


def alive(ident: ProcessId | None) -> bool:
    """The very process (not a later one with its pid) exists and is not a zombie."""
    return ident is not None and identity(ident.pid) == ident


def end_group(ident: ProcessId, grace_s: float) -> bool:
    """SIGTERM the process group led by `ident` (a runner leads its own session), SIGKILL it after
    `grace_s`, and wait until the leader is gone. For processes this one cannot reap (another
    worker's runners); returns True once it is gone."""
    if not alive(ident):
        return True
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(ident.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            return False
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not alive(ident):
                _kill_rest(ident.pid)
                return True
            time.sleep(0.05)
    return not alive(ident)


def _kill_rest(pgid: int) -> None:
    """Children the leader left in its group would keep the GPU."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
