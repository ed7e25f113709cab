"""The runner processes this service process has alive, mirrored in the journal from spawn to reap,
so that the next worker after a crash finds and ends a runner that escaped (webapp/lease_keeper.py)."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from webapp.journal import Journal
from webapp.procinfo import ProcessId, me

if TYPE_CHECKING:
    from webapp.runner_process import RunnerProcess


class RunnerRegistry:
    """The runners this process has alive, mirrored in the journal from spawn to reap."""

    def __init__(self, journal: Journal):
        self.journal = journal
        self.holder = me()
        self._live: dict[ProcessId, "RunnerProcess"] = {}
        self._lock = threading.Lock()

    def spawned(self, runner: "RunnerProcess") -> None:
        with self._lock:
            self._live[runner.ident] = runner
        self.journal.write_runner(runner.ident, self.holder, runner.argv[0])  # OSError: the caller ends it

    def reaped(self, runner: "RunnerProcess") -> None:
        with self._lock:
            self._live.pop(runner.ident, None)
        self.journal.remove_runner(runner.ident)

    def live_ids(self) -> set[ProcessId]:
        with self._lock:
            return set(self._live)
