"""GPU tokens: the gpu-queue-service client and the embedded default, a host-wide lock file.

The queue service's contract, as its callers use it: acquire = `POST {QUEUE_URL}{lane}tasks`
`{"session_id", "tokens", "task_type": "lego"}`; a `queued` answer is polled at
`GET {QUEUE_URL}{lane}tasks/{session_id}` until `processing`; release = `POST
{QUEUE_URL}{lane}task/status` `{"session_id", "status": "completed"|"failed"}`. The lane is empty
by default (`POST /tasks`, the seed's paths). Without QUEUE_URL an exclusive `flock` on
GPU_LOCK_FILE stands in, so two runners never share the GPU even without the service.

Strict by design: a grant is a 2xx whose body is a JSON object with `status` absent (acquire
only), `processing` or `ready`. Anything else (not JSON, an HTML page from a proxy, an unknown
status) is never a grant. Each failed acquire says whether the service may have registered the
session (`SessionState`), so the lease (webapp/leases.py) releases exactly what may be held.
Releases go through urllib3's `Retry` (backoff on connection errors, 429 and 5xx) and answer
what the service really said (`ReleaseAnswer`); the lease keeper retries what is not settled.
"""
from __future__ import annotations

import enum
import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NameResolutionError, NewConnectionError
from urllib3.util.retry import Retry

from webapp.errors import ApiError
from webapp.logs import event

log = logging.getLogger("acestep.webapp.gpu")

# on_wait(position, message): position is None when unknown (the lock file cannot tell).
WaitCallback = Callable[[Optional[int], str], None]
GRANTED = frozenset({"processing", "ready"})
WAITING = "queued"
BAD_POLLS_ALLOWED = 3  # consecutive failed or unusable polls before the wait gives up


class SessionState(str, enum.Enum):
    """After a failed acquire: may the service hold (or queue) the session?"""

    NONE = "none"              # the request never reached it, or it refused it
    REGISTERED = "registered"  # it knows the session: a release is owed
    UNKNOWN = "unknown"        # it may have registered it (a timeout, a 5xx, an unreadable 2xx)


class AcquireFailed(Exception):
    def __init__(self, error: ApiError, session: SessionState):
        super().__init__(error.message)
        self.error = error
        self.session = session


class WaitCancelled(AcquireFailed):
    """The job was cancelled while it waited for tokens."""

    def __init__(self, session: SessionState):
        super().__init__(ApiError("job_cancelled"), session)


class ReleaseAnswer(str, enum.Enum):
    CONFIRMED = "confirmed"  # a 2xx: released
    NOT_HELD = "not_held"    # the service does not know the session: nothing is held
    NOT_YET = "not_yet"      # unknown to the service, but an uncertain acquire may still register it
    RETRY = "retry"          # no useful answer (down, 5xx, 429): try again later
    REFUSED = "refused"      # another 4xx: sending the same again cannot help

    @property
    def settled(self) -> bool:
        return self in (ReleaseAnswer.CONFIRMED, ReleaseAnswer.NOT_HELD)


@dataclass
class Grant:
    backend: str
    session_id: str
    fd: int | None = None  # the lock file's descriptor (lock-file backend)


class LockFileTokens:
    """The embedded default: an exclusive flock on one file per host, opened close-on-exec so a
    runner never inherits it (the kernel drops it when the holder dies)."""

    backend = "lock-file"

    def __init__(self, path: Path, wait_timeout_s: float, poll_s: float = 0.1):
        self.path = Path(path)
        self.wait_timeout_s = wait_timeout_s
        self.poll_s = poll_s

    def acquire(self, session_id: str, cancel: threading.Event, on_wait: WaitCallback) -> Grant:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise AcquireFailed(ApiError("internal_error", f"The GPU lock file cannot be opened ({exc.strerror})."),
                                SessionState.NONE) from None
        deadline = time.monotonic() + self.wait_timeout_s
        told = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                if not told:
                    on_wait(None, "waiting for the GPU: another generation on this host holds it")
                    told = True
                if cancel.wait(self.poll_s):
                    raise WaitCancelled(SessionState.NONE)
                if time.monotonic() > deadline:
                    raise AcquireFailed(ApiError("gpu_busy", f"The GPU stayed busy for {self.wait_timeout_s:g} s "
                                                             "(QUEUE_WAIT_TIMEOUT_S); retry later."), SessionState.NONE)
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {session_id}\n".encode())
        except OSError:
            pass  # the note is for people; the lock is what counts
        event(log, "tokens_granted", session_id=session_id, backend=self.backend)
        return Grant(self.backend, session_id, fd)

    def release(self, grant: Grant | None, session_id: str, status: str, uncertain: bool = False) -> ReleaseAnswer:
        if grant is None or grant.fd is None:
            return ReleaseAnswer.NOT_HELD  # a previous process's lock: the kernel dropped it when it died
        fd, grant.fd = grant.fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        return ReleaseAnswer.CONFIRMED

    def describe(self) -> dict:
        """For /health: is the lock free now? (A test lock on a new descriptor, released at once.)"""
        info = {"backend": self.backend}
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            return {**info, "reachable": False, "error": exc.strerror}
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            held = False
        except BlockingIOError:
            held = True
        finally:
            os.close(fd)
        return {**info, "reachable": True, "gpu_held": held}


def _session(retry: Retry) -> requests.Session:
    http = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    http.mount("http://", adapter)
    http.mount("https://", adapter)
    return http


def _never_sent(exc: requests.RequestException) -> bool:
    """A connection that was never made: the service cannot have seen the request."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", exc.args[0]) if exc.args else None
    return isinstance(reason, (NewConnectionError, NameResolutionError))


def _grant_status(resp: requests.Response, absent_means_granted: bool) -> str | None:
    """The answer's status ("processing", "queued"...), or None when the answer is unusable."""
    try:
        data = resp.json()
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    status = data.get("status")
    if status is None:
        return "processing" if absent_means_granted else None
    return status.lower() if isinstance(status, str) else None


def _position(resp: requests.Response) -> int | None:
    try:
        value = resp.json().get("position")
    except (ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e9 else None


class QueueServiceTokens:
    """Client of the gpu-queue-service (Go, port 8085)."""

    backend = "gpu-queue-service"

    def __init__(self, root_url: str, base_url: str, tokens: int, wait_timeout_s: float, poll_s: float,
                 http_timeout_s: float, fallback: LockFileTokens | None = None):
        self.root_url = root_url if root_url.endswith("/") else root_url + "/"  # QUEUE_URL
        self.base_url = base_url  # QUEUE_URL + lane + "/" (just QUEUE_URL with the default empty lane)
        self.tokens = tokens
        self.wait_timeout_s = wait_timeout_s
        self.poll_s = poll_s
        self.http_timeout_s = http_timeout_s
        self.fallback = fallback  # set when QUEUE_PROCEED_IF_UNREACHABLE
        # An acquire is never resent (a second POST would be a second registration); polls and
        # releases are safe to repeat, and urllib3 backs off between attempts.
        self._acquire_http = _session(Retry(total=0, raise_on_status=False))
        self._poll_http = _session(Retry(total=2, connect=2, read=1, status=2, backoff_factor=0.2,
                                         status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None,
                                         raise_on_status=False))
        self._release_http = _session(Retry(total=4, connect=4, read=2, status=4, backoff_factor=0.25, backoff_max=2.0,
                                            status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None,
                                            raise_on_status=False, respect_retry_after_header=False))
        self._health_cache: tuple[float, dict] | None = None
        self._fallback_grants: dict[str, Grant] = {}

    # ---- acquire ----------------------------------------------------------------------------------

    def acquire(self, session_id: str, cancel: threading.Event, on_wait: WaitCallback) -> Grant:
        body = {"session_id": session_id, "tokens": self.tokens, "task_type": "lego"}
        try:
            resp = self._acquire_http.post(self.base_url + "tasks", json=body, timeout=self.http_timeout_s)
        except requests.RequestException as exc:
            never = _never_sent(exc)
            event(log, "gpu_queue_unreachable", level=logging.WARNING, error=type(exc).__name__, sent=not never,
                  fallback="lock-file" if self.fallback and never else "none")
            if never and self.fallback is not None:
                grant = self.fallback.acquire(session_id, cancel, on_wait)
                self._fallback_grants[session_id] = grant
                return grant
            raise AcquireFailed(ApiError("gpu_queue_unreachable"),
                                SessionState.NONE if never else SessionState.UNKNOWN) from None
        if resp.status_code >= 400:
            state = SessionState.REGISTERED if resp.status_code == 409 else (
                SessionState.UNKNOWN if resp.status_code >= 500 else SessionState.NONE)
            raise AcquireFailed(ApiError("gpu_queue_error", f"The GPU token service refused the request (HTTP {resp.status_code}); "
                                                            "retry in a minute.",
                                         retryable=resp.status_code >= 500 or resp.status_code in (409, 429)), state)
        status = _grant_status(resp, absent_means_granted=200 <= resp.status_code < 300)
        if status is None or (status not in GRANTED and status != WAITING):
            event(log, "gpu_queue_bad_answer", level=logging.WARNING, call="acquire", http_status=resp.status_code,
                  body=resp.text[:120])
            raise AcquireFailed(ApiError("gpu_queue_error", "The GPU token service gave an answer that is not a grant; "
                                                            "retry in a minute."), SessionState.UNKNOWN)
        if status == WAITING:
            self._wait_until_granted(session_id, _position(resp), cancel, on_wait)
        event(log, "tokens_granted", session_id=session_id, backend=self.backend, tokens=self.tokens)
        return Grant(self.backend, session_id)

    def _wait_until_granted(self, session_id: str, position: int | None, cancel: threading.Event,
                            on_wait: WaitCallback) -> None:
        """Poll until `processing`; every failure from here on leaves a registered session."""
        deadline = time.monotonic() + self.wait_timeout_s
        bad = 0
        while True:
            on_wait(position, f"waiting for the GPU: position {position} in the GPU queue" if position else "waiting for the GPU")
            if cancel.wait(self.poll_s):
                raise WaitCancelled(SessionState.REGISTERED)
            if time.monotonic() > deadline:
                raise AcquireFailed(ApiError("gpu_busy", f"The GPU stayed busy for {self.wait_timeout_s:g} s "
                                                         "(QUEUE_WAIT_TIMEOUT_S); retry later."), SessionState.REGISTERED)
            try:
                resp = self._poll_http.get(self.base_url + f"tasks/{session_id}", timeout=self.http_timeout_s)
            except requests.RequestException as exc:
                bad += 1
                if bad >= BAD_POLLS_ALLOWED:
                    raise AcquireFailed(ApiError("gpu_queue_unreachable", "The GPU token service stopped answering while "
                                                                          "the job waited; retry in a minute."),
                                        SessionState.REGISTERED) from exc
                continue
            if resp.status_code == 404:
                raise AcquireFailed(ApiError("gpu_queue_error", "The GPU token service lost the job's place in its queue; "
                                                                "retry."), SessionState.REGISTERED)
            status = _grant_status(resp, absent_means_granted=False) if resp.status_code < 300 else None
            if status in GRANTED:
                return
            if status == WAITING:
                bad = 0
                position = _position(resp)
                continue
            bad += 1  # an error status, a page that is not JSON, an unknown status: never a grant
            event(log, "gpu_queue_bad_answer", level=logging.WARNING, call="poll", http_status=resp.status_code,
                  body=resp.text[:120])
            if bad >= BAD_POLLS_ALLOWED:
                raise AcquireFailed(ApiError("gpu_queue_error", "The GPU token service kept giving answers that are not "
                                                                "a grant; retry in a minute."), SessionState.REGISTERED)

    # ---- release ----------------------------------------------------------------------------------

    def release(self, grant: Grant | None, session_id: str, status: str, uncertain: bool = False) -> ReleaseAnswer:
        fallback = self._fallback_grants.pop(session_id, None)
        if fallback is not None:
            return self.fallback.release(fallback, session_id, status)
        try:
            resp = self._release_http.post(self.base_url + "task/status", json={"session_id": session_id, "status": status},
                                           timeout=self.http_timeout_s)
        except requests.RequestException as exc:
            event(log, "token_release_unanswered", level=logging.WARNING, session_id=session_id, error=type(exc).__name__)
            return ReleaseAnswer.RETRY
        if 200 <= resp.status_code < 300:
            return ReleaseAnswer.CONFIRMED
        if resp.status_code == 404:
            return ReleaseAnswer.NOT_YET if uncertain else ReleaseAnswer.NOT_HELD
        if resp.status_code == 429 or resp.status_code >= 500:
            return ReleaseAnswer.RETRY
        event(log, "token_release_refused", level=logging.ERROR, session_id=session_id, http_status=resp.status_code,
              body=resp.text[:120])
        return ReleaseAnswer.REFUSED

    def describe(self) -> dict:
        """For /health: can the service be reached now? Cached for 5 s, 1 s timeout: /health stays cheap."""
        now = time.monotonic()
        if self._health_cache and now - self._health_cache[0] < 5:
            return self._health_cache[1]
        info: dict = {"backend": self.backend, "tokens_per_job": self.tokens,
                      "fallback": "lock-file" if self.fallback else None}
        try:
            resp = self._acquire_http.get(self.root_url + "health", timeout=min(1.0, self.http_timeout_s))
            info.update(reachable=resp.status_code < 500)
        except requests.RequestException:
            info.update(reachable=False)
        self._health_cache = (now, info)
        return info


def make_tokens(settings) -> LockFileTokens | QueueServiceTokens:
    lock = LockFileTokens(settings.gpu_lock_file, settings.queue_wait_timeout_s)
    if not settings.queue_url:
        return lock
    return QueueServiceTokens(settings.queue_url, settings.queue_base_url, settings.queue_tokens, settings.queue_wait_timeout_s,
                              settings.queue_poll_interval_s, settings.queue_http_timeout_s,
                              fallback=lock if settings.queue_proceed_if_unreachable else None)
