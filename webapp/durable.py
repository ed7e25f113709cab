"""Small JSON records on disk that are either wholly there or not at all.

Job records and the lease journal must survive a SIGKILL or a power cut at any instant: each is
written to a temporary file in the same folder, flushed to the disk (fsync), renamed over the
old one (atomic on POSIX) and the folder is synced, so a reader finds the old record or the new
one, never half of either. A failed write (a full disk) raises OSError and leaves nothing behind.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
from pathlib import Path

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def is_storage_full(exc: BaseException) -> bool:
    """An OSError that means "the disk cannot take more" (full, quota, read-only)."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def write_json(path: Path, data: dict) -> None:
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False, default=str).encode()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def read_json(path: Path) -> dict | None:
    """The record, or None when it is missing or unreadable (a torn write cannot exist, but a
    hand-edited or foreign file can)."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files a killed writer left behind (never read: the rename did not happen)."""
    if folder.is_dir():
        for entry in folder.glob(".*.tmp"):
            entry.unlink(missing_ok=True)
