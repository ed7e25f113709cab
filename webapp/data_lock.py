"""A data folder belongs to one running service: an exclusive lock on DATA_DIR/service.lock.

Everything under DATA_DIR (jobs, results, the lease journal) is owned by the process that holds
this lock, and only that process may recover, resume or delete it. A second service started on
the same folder (a second `make serve`, a Python shell importing `wsgi` on the production host)
is refused with a sentence naming the holder, before it touches anything. The lock is an
`flock` on a file opened close-on-exec: the kernel drops it when the holder dies, even by SIGKILL,
and runner subprocesses never inherit it. gunicorn's replacement worker on a reload is the one
case that waits: its predecessor, a child of the same master, is finishing its jobs.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from webapp.procinfo import ProcessId, alive, me
from webapp.settings import SettingsError

LOCK_NAME = "service.lock"


class DataFolderInUse(SettingsError):
    """Another live service holds the data folder."""


def _holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    parts = [f"pid {holder['pid']}"] if "pid" in holder else []
    if holder.get("port"):
        parts.append(f"port {holder['port']}")
    if holder.get("started_at"):
        parts.append("started " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started_at"])))
    return ", ".join(parts) or "a process that did not say who it is"


def _same_master(holder: dict) -> bool:
    """The holder is another worker of this gunicorn master (a reload): it is about to finish."""
    parent = os.getppid()
    return (parent > 1 and holder.get("pid") != os.getpid() and holder.get("ppid") == parent
            and alive(ProcessId.from_dict(holder)))


class DataLock:
    def __init__(self, data_dir: Path, port: int | None = None):
        self.path = Path(data_dir) / LOCK_NAME
        self.port = port
        self._fd: int | None = None

    def acquire(self, wait_for_sibling_s: float = 0.0) -> "DataLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait_for_sibling_s
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                holder = _holder(self.path)
                if _same_master(holder) and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                raise DataFolderInUse(
                    f"DATA_DIR={self.path.parent} is in use by another instance of this service ({_describe(holder)}); "
                    "stop that one first, or give this one its own DATA_DIR (and PORT).")
            ident = me()
            info = {**ident.as_dict(), "ppid": os.getppid(), "port": self.port, "started_at": time.time(),
                    "host": socket.gethostname()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the one descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None


def check_free(data_dir: Path) -> str | None:
    """For gunicorn's config, before it binds: the sentence to stop with when another service holds
    the folder (not a worker of this very master, which a reload re-reads the config beside)."""
    path = Path(data_dir) / LOCK_NAME
    if not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError:
        holder = _holder(path)
        if holder.get("ppid") == os.getpid():
            return None
        return (f"DATA_DIR={path.parent} is in use by another instance of this service ({_describe(holder)}); "
                "stop that one first, or give this one its own DATA_DIR (and PORT).")
    finally:
        os.close(fd)

