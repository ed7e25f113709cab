"""Reconciles the journal with the world: when a worker starts, and every few seconds after.

What it catches (each case is a test of tests/test_web_faults.py):
- a runner whose worker is gone (SIGKILL, the OOM killer) and that did not end by itself: its
  process group is ended (SIGTERM, then SIGKILL), and only then is the runner's record removed;
- a lease whose holder is gone: released as `failed` once its runner is gone, retried until the
  token service confirms;
- a runner of this very worker that no RunnerProcess knows any more (a bug): ended the same way;
- releases not yet confirmed (the service down, slow or refusing): sent again, with growing pauses.

It runs before the job queue takes its first job, so a restarted service never starts a runner
beside an orphan that still holds the GPU.
"""
from __future__ import annotations

import logging
import threading

from webapp.journal import Journal
from webapp.leases import Leases
from webapp.logs import event
from webapp.procinfo import ProcessId, alive, end_group
from webapp.runner_registry import RunnerRegistry

log = logging.getLogger("acestep.webapp.leases")

TICK_S = 0.5
SCAN_EVERY_TICKS = 10  # the journal is read every 5 s; due releases are looked at every tick


class LeaseKeeper:
    def __init__(self, leases: Leases, journal: Journal, runners: RunnerRegistry, grace_s: float):
        self.leases = leases
        self.journal = journal
        self.runners = runners
        self.grace_s = grace_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        ticks = 0
        while not self._stop.wait(TICK_S):
            ticks += 1
            try:
                self.leases.retry_due()
                if ticks % SCAN_EVERY_TICKS == 0:
                    self.reconcile()
            except Exception:  # noqa: BLE001 - the keeper must keep going
                log.exception("lease keeper")

    def reconcile(self) -> dict:
        """End orphaned runners, then release the leases their dead holders left."""
        me = self.runners.holder
        counts = {"runners_ended": 0, "leases_adopted": 0}
        for runner, holder in self.journal.runners():
            if holder == me and runner in self.runners.live_ids():  # asked now: a spare may have just started
                continue
            if holder is not None and holder != me and alive(holder):
                continue  # another live process's (the data lock makes this a short overlap at most)
            if alive(runner):
                event(log, "orphan_runner_ending", level=logging.WARNING, pid=runner.pid,
                      holder=holder.pid if holder else None, holder_alive=holder is not None and alive(holder))
                if not end_group(runner, self.grace_s):
                    continue  # still there: try again at the next scan, its record stays
                counts["runners_ended"] += 1
            self.journal.remove_runner(runner)
        for record in self.journal.leases():
            sid = record["session_id"]
            holder = ProcessId.from_dict(record.get("holder"))
            if self.leases.knows(sid):
                continue
            if holder is not None and holder != me and alive(holder):
                continue
            runner = ProcessId.from_dict(record.get("runner"))
            if runner is not None and alive(runner):
                if runner in self.runners.live_ids() or not end_group(runner, self.grace_s):
                    continue  # the tokens stay held while their runner may still use the GPU
            self.leases.adopt(record)
            counts["leases_adopted"] += 1
        if any(counts.values()):
            event(log, "leases_reconciled", level=logging.WARNING, **counts)
        return counts
