"""The objects one running service shares between requests, and its orderly end.

`Service.close` is the one shutdown path (gunicorn's signal hooks, `atexit`, the tests): the
queue stops and its worker ends every runner, the leases' releases get a last inline try (what is
still unconfirmed stays in the journal for the next start), and the data folder is unlocked last.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flask import current_app

from webapp.checkpoints import CheckpointInfo, inspect_checkpoints

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXTENSION_KEY = "acestep"


def runner_command(settings) -> list[str]:
    """RUNNER_COMMAND, or this interpreter's `-m runner` run from the project root."""
    return list(settings.runner_command) or [sys.executable, "-m", "runner"]


@dataclass
class Service:
    settings: object
    jobs: object  # webapp.job_queue.JobManager
    tokens: object  # webapp.gpu_tokens.LockFileTokens | QueueServiceTokens
    checkpoints: CheckpointInfo
    leases: object = None  # webapp.leases.Leases
    keeper: object = None  # webapp.lease_keeper.LeaseKeeper
    data_lock: object = None  # webapp.data_lock.DataLock
    started_at: float = field(default_factory=time.time)
    _closed: threading.Event = field(default_factory=threading.Event)
    _closing: threading.Lock = field(default_factory=threading.Lock)

    def refresh_checkpoints(self) -> CheckpointInfo:
        s = self.settings
        self.checkpoints = inspect_checkpoints(s.acestep_checkpoints, s.acestep_engine, s.acestep_config_path)
        return self.checkpoints

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the queue, end every runner, give the releases a last try, unlock the data folder.
        A second caller (gunicorn's worker_exit after the signal's thread) waits for the first."""
        with self._closing:
            if not self._closed.is_set():
                self._close(timeout_s)

    def _close(self, timeout_s: float) -> None:
        self.jobs.shutdown(timeout_s)
        if self.leases is not None:
            self.leases.retry_due()
        if self.keeper is not None:
            self.keeper.stop()
        self._closed.set()
        if self.data_lock is not None and not self.jobs.worker_alive:
            self.data_lock.release()  # else the process's exit drops it, after its runners


def current_service() -> Service:
    return current_app.extensions[EXTENSION_KEY]
