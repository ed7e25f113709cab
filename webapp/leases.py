"""GPU leases that cannot leak: a context object whose exit ends the runner first, then releases.

    with leases.acquire(session_id, job_id, cancel, on_wait) as lease:
        lease.bind(runner)
        ...                      # whatever raises in here
    # here the runner has been reaped, then the tokens were released (or are being retried)

Guarantees, by construction rather than by care at each call site:
- the lease is in the journal (webapp/journal.py) before the acquire is sent, and leaves it only
  when the token service has confirmed the release, so a crash at any instant leaves a record
  that the next worker reconciles (webapp/lease_keeper.py);
- `close` (the exit) ends the bound runner and waits until it is reaped before it releases; a
  runner that cannot be killed keeps its lease held, on record, until it is gone;
- a release is sent until the service confirms it: once inline, then by the keeper with growing
  pauses; the log says `tokens_released` only when it was confirmed, and what was answered;
- an acquire whose fate is unknown (a timeout, a 5xx, an unreadable answer) is released too,
  and a release the service does not recognise yet is retried until the acquire could no
  longer register;
- a lease handed to a warm runner (`keep`) survives the block; its owner closes it later.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from webapp.errors import ApiError
from webapp.gpu_tokens import AcquireFailed, Grant, QueueServiceTokens, ReleaseAnswer, SessionState
from webapp.journal import Journal, LeaseState
from webapp.logs import event
from webapp.procinfo import ProcessId, me

log = logging.getLogger("acestep.webapp.leases")

RETRY_MAX_PAUSE_S = 60.0
# How long a release of an acquire with an unknown fate is retried while the service says it does
# not know the session: the acquire could still be on its way.
UNCERTAIN_WINDOW_S = 120.0


@dataclass
class PendingRelease:
    session_id: str
    job_id: str | None
    backend: str
    base_url: str | None
    status: str
    uncertain: bool
    grant: Grant | None = None
    lease: "Lease | None" = None
    attempts: int = 0
    next_at: float = 0.0
    give_up_at: float = 0.0
    told: set = field(default_factory=set)
    busy: bool = False  # an attempt is in flight (the worker's inline one, or the keeper's)


class Lease:
    """GPU tokens held for one runner. Use it as a context manager; see the module's docstring."""

    def __init__(self, leases: "Leases", session_id: str, job_id: str | None):
        self._leases = leases
        self.session_id = session_id
        self.job_id = job_id
        self.state = LeaseState.ACQUIRING
        self.grant: Grant | None = None
        self.runner = None  # webapp.runner_process.RunnerProcess
        self.status = "failed"  # the release status unless the job says it completed
        self.kept = False
        self.uncertain = False  # the acquire's fate is unknown: the service may register it late
        self.granted_at: float | None = None
        self.released_at: float | None = None  # when the release was confirmed
        self._closed = False
        self._close_lock = threading.Lock()

    @property
    def backend(self) -> str:
        return self._leases.tokens.backend

    def record(self) -> dict:
        runner = self.runner.ident.as_dict() if self.runner is not None and self.runner.ident else None
        return {"session_id": self.session_id, "job_id": self.job_id, "state": self.state.value,
                "backend": self.grant.backend if self.grant else self._leases.tokens.backend,
                "base_url": getattr(self._leases.tokens, "base_url", None), "holder": self._leases.holder.as_dict(),
                "runner": runner, "status": self.status, "uncertain": self.uncertain, "granted_at": self.granted_at}

    def move_to(self, new: LeaseState) -> None:
        if not self.state.may_become(new):
            raise RuntimeError(f"lease {self.session_id}: {self.state.value} -> {new.value} is not a legal transition")
        self.state = new

    def bind(self, runner) -> None:
        """The runner that uses these tokens: the exit ends it before releasing them."""
        self.runner = runner
        self._leases.save(self)

    def keep(self) -> "Lease":
        """Hand the lease to a warm runner's owner: the block's exit leaves it held."""
        self.kept = True
        return self

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.kept:
            self.close()

    def close(self, status: str | None = None) -> None:
        """End the runner (reaped), then release. Idempotent; never raises for a runner or a release."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.kept = False
        if status is not None:
            self.status = status
        runner = self.runner
        if runner is not None and not runner.end(self._leases.grace_s):
            event(log, "runner_would_not_end", level=logging.ERROR, session_id=self.session_id, pid=runner.pid)
            self._leases.defer(self)  # on record with its runner: released once the runner is gone
            return
        self._leases.release(self)


class Leases:
    """Acquires leases, releases them until confirmed, and adopts the records a dead worker left."""

    def __init__(self, tokens, journal: Journal, grace_s: float, settings=None):
        self.tokens = tokens
        self.journal = journal
        self.grace_s = grace_s
        self.settings = settings
        self.holder: ProcessId = me()
        self._live: dict[str, Lease] = {}
        self._pending: dict[str, PendingRelease] = {}
        self._deferred: dict[str, Lease] = {}
        self._lock = threading.Lock()

    # ---- acquire ------------------------------------------------------------------------------------

    def acquire(self, session_id: str, job_id: str | None, cancel: threading.Event, on_wait) -> Lease:
        """A granted lease, or AcquireFailed (with the job's error) after settling what was asked."""
        lease = Lease(self, session_id, job_id)
        with self._lock:
            self._live[session_id] = lease  # known before its record exists: the keeper never adopts it
        try:
            self.journal.write_lease(lease.record())
        except OSError as exc:
            with self._lock:
                self._live.pop(session_id, None)
            raise AcquireFailed(ApiError("storage_full", f"The service cannot record the GPU lease ({exc.strerror}); "
                                                         "retry later."), SessionState.NONE) from None
        try:
            grant = self.tokens.acquire(session_id, cancel, on_wait)
        except AcquireFailed as failed:
            self._abandon(lease, failed.session)
            raise
        except BaseException:
            self._abandon(lease, SessionState.UNKNOWN)
            raise
        lease.grant = grant
        lease.granted_at = time.time()
        lease.move_to(LeaseState.HELD)
        self.save(lease)
        return lease

    def _abandon(self, lease: Lease, session: SessionState) -> None:
        """An acquire that failed: release what the service may have registered, nothing else."""
        with lease._close_lock:
            lease._closed = True
        if session is SessionState.NONE:
            self.journal.remove_lease(lease.session_id)  # the record first, as everywhere: never adopted
            with self._lock:
                self._live.pop(lease.session_id, None)
            return
        self.release(lease, uncertain=session is SessionState.UNKNOWN)

    def save(self, lease: Lease) -> None:
        try:
            self.journal.write_lease(lease.record())
        except OSError as exc:  # the lease itself goes on; only a crash now would lose the runner's pid
            event(log, "lease_record_not_saved", level=logging.ERROR, session_id=lease.session_id, error=str(exc))

    # ---- release ------------------------------------------------------------------------------------

    def release(self, lease: Lease, uncertain: bool = False) -> None:
        """The runner is gone: send the release now, and leave it to the keeper if not confirmed."""
        if lease.state is not LeaseState.RELEASING:
            lease.move_to(LeaseState.RELEASING)
        lease.uncertain = lease.uncertain or uncertain
        self.save(lease)
        pending = PendingRelease(lease.session_id, lease.job_id, lease.backend, getattr(self.tokens, "base_url", None),
                                 lease.status, lease.uncertain, lease.grant, lease,
                                 give_up_at=time.monotonic() + UNCERTAIN_WINDOW_S)
        with self._lock:
            self._live.pop(lease.session_id, None)
            self._deferred.pop(lease.session_id, None)
            self._pending[lease.session_id] = pending
        self._attempt(pending)

    def defer(self, lease: Lease) -> None:
        with self._lock:
            self._deferred[lease.session_id] = lease

    def adopt(self, record: dict) -> None:
        """A lease a dead worker left on record (its runner already ended): release it as ours."""
        sid = record["session_id"]
        with self._lock:
            if sid in self._pending or sid in self._live:
                return
        uncertain = record.get("state") == LeaseState.ACQUIRING.value or bool(record.get("uncertain"))
        pending = PendingRelease(sid, record.get("job_id"), str(record.get("backend")), record.get("base_url"),
                                 "failed", uncertain, give_up_at=time.monotonic() + UNCERTAIN_WINDOW_S)
        event(log, "lease_adopted", level=logging.WARNING, session_id=sid, job_id=pending.job_id,
              previous_holder=record.get("holder"), state=record.get("state"))
        try:
            self.journal.write_lease({**record, "state": LeaseState.RELEASING.value, "holder": self.holder.as_dict(),
                                      "status": "failed", "uncertain": uncertain})
        except OSError:
            pass
        with self._lock:
            self._pending[sid] = pending
        self._attempt(pending)

    def retry_due(self) -> None:
        """The keeper's turn: releases whose pause is over, and deferred leases whose runner is gone."""
        for lease in list(self._deferred.values()):
            if lease.runner is None or not lease.runner.alive():
                if lease.runner is not None:
                    lease.runner.end(self.grace_s)
                self.release(lease)
        now = time.monotonic()
        for pending in [p for p in list(self._pending.values()) if p.next_at <= now and not p.busy]:
            self._attempt(pending)

    def _client_for(self, pending: PendingRelease):
        tokens = self.tokens
        if pending.backend == tokens.backend and getattr(tokens, "base_url", None) == pending.base_url:
            return tokens
        if pending.backend == QueueServiceTokens.backend and pending.base_url and self.settings is not None:
            s = self.settings  # QUEUE_URL changed since the lease was taken: release where it was taken
            return QueueServiceTokens(pending.base_url, pending.base_url, s.queue_tokens, s.queue_wait_timeout_s,
                                      s.queue_poll_interval_s, s.queue_http_timeout_s)
        return None  # a lock-file lease of a dead process: the kernel released it with its holder

    def _attempt(self, pending: PendingRelease) -> None:
        with self._lock:
            if pending.busy or pending.session_id not in self._pending:
                return  # the other thread is sending it, or it was settled meanwhile
            pending.busy = True
        try:
            self._send(pending)
        finally:
            pending.busy = False

    def _send(self, pending: PendingRelease) -> None:
        client = self._client_for(pending)
        try:
            answer = (client.release(pending.grant, pending.session_id, pending.status, pending.uncertain)
                      if client is not None else ReleaseAnswer.NOT_HELD)
        except Exception:  # noqa: BLE001 - a bug in a client must not lose the release
            log.exception("release of %s", pending.session_id)
            answer = ReleaseAnswer.RETRY
        pending.attempts += 1
        now = time.monotonic()
        if answer.settled or (answer is ReleaseAnswer.NOT_YET and now >= pending.give_up_at):
            self.journal.remove_lease(pending.session_id)  # the record first: the keeper never adopts it
            with self._lock:
                self._pending.pop(pending.session_id, None)
            if pending.lease is not None:
                pending.lease.released_at = time.time()
            if answer.settled:
                event(log, "tokens_released", session_id=pending.session_id, job_id=pending.job_id, backend=pending.backend,
                      status=pending.status, answer=answer.value, attempts=pending.attempts)
            else:
                event(log, "token_session_never_registered", level=logging.WARNING, session_id=pending.session_id,
                      job_id=pending.job_id, attempts=pending.attempts)
            return
        pause = min(RETRY_MAX_PAUSE_S, 0.5 * 2 ** min(pending.attempts, 8))
        pending.next_at = now + pause
        if answer.value not in pending.told or pending.attempts % 10 == 0:
            pending.told.add(answer.value)
            event(log, "token_release_pending", level=logging.WARNING if answer is not ReleaseAnswer.REFUSED else logging.ERROR,
                  session_id=pending.session_id, job_id=pending.job_id, answer=answer.value, attempts=pending.attempts,
                  next_in_s=round(pause, 1))

    # ---- what /health and the keeper read -------------------------------------------------------------

    def held(self) -> int:
        """Leases granted and not yet released (a warm runner's included)."""
        with self._lock:
            return sum(1 for lease in self._live.values() if lease.state is LeaseState.HELD) + len(self._deferred)

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def knows(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._live or session_id in self._pending or session_id in self._deferred
