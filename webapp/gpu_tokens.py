"""GPU tokens: the gpu-queue-service client and the embedded default, a host-wide lock file.

Contract (DESIGN.md section 6): acquire = `POST {QUEUE_URL}{lane}/tasks`; a `queued` answer is
polled at `GET {QUEUE_URL}{lane}/tasks/{session_id}` until `processing`; release = `POST
{QUEUE_URL}{lane}/task/status` with `completed` or `failed`. Without QUEUE_URL an exclusive
`flock` on GPU_LOCK_FILE stands in, so two runners never share the GPU even without the service.

Invariants kept here: every acquire call that may have reached the service gets exactly one
release (`Lease.release` is idempotent and is also sent when the wait is abandoned), and an
unreachable service is a retryable `gpu_queue_unreachable` unless QUEUE_PROCEED_IF_UNREACHABLE.
The caller (jobs.py) releases only after the runner process has exited.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import requests

from webapp.errors import ApiError
from webapp.logs import event

log = logging.getLogger("acestep.webapp.gpu")

# on_wait(position, message): position is None when unknown (the lock file cannot tell).
WaitCallback = Callable[[Optional[int], str], None]


class Cancelled(Exception):
    """The job was cancelled while it waited for tokens."""


class Lease:
    """Held GPU tokens; `release` sends exactly one release, however often it is called."""

    def __init__(self, backend: str, session_id: str, release_fn: Callable[[str], None]):
        self.backend = backend
        self.session_id = session_id
        self.granted_at = time.time()
        self._release_fn = release_fn
        self._lock = threading.Lock()
        self.released_at: float | None = None

    def release(self, status: str = "completed") -> None:
        with self._lock:
            if self.released_at is not None:
                return
            self.released_at = time.time()
        try:
            self._release_fn(status)
        finally:
            event(log, "tokens_released", session_id=self.session_id, backend=self.backend, status=status)


class LockFileTokens:
    """The embedded default: an exclusive flock on one file per host."""

    backend = "lock-file"

    def __init__(self, path: Path, wait_timeout_s: float, poll_s: float = 0.1):
        self.path = Path(path)
        self.wait_timeout_s = wait_timeout_s
        self.poll_s = poll_s

    def acquire(self, session_id: str, cancel: threading.Event, on_wait: WaitCallback) -> Lease:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
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
                    raise Cancelled()
                if time.monotonic() > deadline:
                    raise ApiError("gpu_busy", f"The GPU stayed busy for {self.wait_timeout_s:g} s (QUEUE_WAIT_TIMEOUT_S); retry later.")
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {session_id}\n".encode())
        except OSError:
            pass
        event(log, "tokens_granted", session_id=session_id, backend=self.backend)

        def _release(_status: str) -> None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

        return Lease(self.backend, session_id, _release)

    def describe(self) -> dict:
        """For /health: is the lock free now? (A test lock on a new descriptor, released at once.)"""
        info = {"backend": self.backend, "lock_file": str(self.path)}
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


class QueueServiceTokens:
    """Client of the gpu-queue-service (Go, port 8085)."""

    backend = "gpu-queue-service"

    def __init__(self, root_url: str, base_url: str, tokens: int, wait_timeout_s: float, poll_s: float,
                 http_timeout_s: float, fallback: LockFileTokens | None = None, session: requests.Session | None = None):
        self.root_url = root_url if root_url.endswith("/") else root_url + "/"  # QUEUE_URL
        self.base_url = base_url  # QUEUE_URL + lane + "/"
        self.tokens = tokens
        self.wait_timeout_s = wait_timeout_s
        self.poll_s = poll_s
        self.http_timeout_s = http_timeout_s
        self.fallback = fallback  # set when QUEUE_PROCEED_IF_UNREACHABLE
        self.http = session or requests.Session()
        self._health_cache: tuple[float, dict] | None = None

    def acquire(self, session_id: str, cancel: threading.Event, on_wait: WaitCallback) -> Lease:
        body = {"session_id": session_id, "tokens": self.tokens, "task_type": "lego"}
        try:
            resp = self.http.post(self.base_url + "tasks", json=body, timeout=self.http_timeout_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            if isinstance(exc, requests.ReadTimeout):
                # The request may have been registered: release it so the pool does not leak.
                self._send_release(session_id, "failed")
            return self._unreachable(session_id, cancel, on_wait, exc)
        if resp.status_code >= 400:
            raise ApiError("gpu_queue_error", f"The GPU token service refused the request (HTTP {resp.status_code}); retry in a minute.",
                           retryable=resp.status_code >= 500 or resp.status_code == 429)
        # From here the service knows our session: every path out must release it once.
        lease = Lease(self.backend, session_id, lambda status: self._send_release(session_id, status))
        try:
            state = _json(resp)
            self._wait_until_granted(session_id, state, cancel, on_wait)
        except BaseException:
            lease.release("failed")
            raise
        lease.granted_at = time.time()
        event(log, "tokens_granted", session_id=session_id, backend=self.backend, tokens=self.tokens)
        return lease

    def _wait_until_granted(self, session_id: str, state: dict, cancel: threading.Event, on_wait: WaitCallback) -> None:
        deadline = time.monotonic() + self.wait_timeout_s
        failures = 0
        while True:
            status = str(state.get("status") or "processing").lower()
            if status in ("processing", "ready", "granted", "running"):
                return
            if status not in ("queued", "waiting", "pending"):
                raise ApiError("gpu_queue_error", f"The GPU token service answered status {status[:30]!r}; retry in a minute.")
            position = state.get("position")
            position = int(position) if isinstance(position, (int, float)) and not isinstance(position, bool) else None
            on_wait(position, f"waiting for the GPU: position {position} in the GPU queue" if position else "waiting for the GPU")
            if cancel.wait(self.poll_s):
                raise Cancelled()
            if time.monotonic() > deadline:
                raise ApiError("gpu_busy", f"The GPU stayed busy for {self.wait_timeout_s:g} s (QUEUE_WAIT_TIMEOUT_S); retry later.")
            try:
                resp = self.http.get(self.base_url + f"tasks/{session_id}", timeout=self.http_timeout_s)
                if resp.status_code >= 400:
                    raise ApiError("gpu_queue_error", f"The GPU token service lost our place in its queue (HTTP {resp.status_code}); retry.")
                state = _json(resp)
                failures = 0
            except (requests.ConnectionError, requests.Timeout):
                failures += 1
                if failures >= 3:
                    raise ApiError("gpu_queue_unreachable", "The GPU token service stopped answering while the job waited; retry in a minute.") from None

    def _unreachable(self, session_id: str, cancel: threading.Event, on_wait: WaitCallback, exc: Exception) -> Lease:
        event(log, "gpu_queue_unreachable", level=logging.WARNING, url=self.base_url, error=type(exc).__name__,
              fallback="lock-file" if self.fallback else "none")
        if self.fallback is not None:
            return self.fallback.acquire(session_id, cancel, on_wait)
        raise ApiError("gpu_queue_unreachable")

    def _send_release(self, session_id: str, status: str) -> None:
        body = {"session_id": session_id, "status": status}
        for attempt in range(3):
            try:
                resp = self.http.post(self.base_url + "task/status", json=body, timeout=self.http_timeout_s)
                if resp.status_code >= 400:
                    event(log, "token_release_refused", level=logging.WARNING, session_id=session_id, http_status=resp.status_code)
                return
            except requests.ConnectionError as exc:
                # Not connected: the release did not arrive; try again briefly.
                if attempt == 2:
                    event(log, "token_release_failed", level=logging.ERROR, session_id=session_id, error=str(exc)[:200])
                    return
                time.sleep(0.2 * (attempt + 1))
            except requests.Timeout:
                # It may have arrived: sending it again could release twice.
                event(log, "token_release_timeout", level=logging.ERROR, session_id=session_id)
                return

    def describe(self) -> dict:
        """For /health: can the service be reached now? Cached for 5 s, 1 s timeout: /health stays cheap."""
        now = time.monotonic()
        if self._health_cache and now - self._health_cache[0] < 5:
            return self._health_cache[1]
        info: dict = {"backend": self.backend, "url": self.base_url, "tokens_per_job": self.tokens,
                      "fallback": "lock-file" if self.fallback else None}
        try:
            resp = self.http.get(self.root_url + "health", timeout=min(1.0, self.http_timeout_s))
            info.update(reachable=True, http_status=resp.status_code)
        except (requests.ConnectionError, requests.Timeout) as exc:
            info.update(reachable=False, error=type(exc).__name__)
        self._health_cache = (now, info)
        return info


def _json(resp: requests.Response) -> dict:
    try:
        data = resp.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def make_tokens(settings) -> LockFileTokens | QueueServiceTokens:
    lock = LockFileTokens(settings.gpu_lock_file, settings.queue_wait_timeout_s)
    if not settings.queue_url:
        return lock
    return QueueServiceTokens(settings.queue_url, settings.queue_base_url, settings.queue_tokens, settings.queue_wait_timeout_s,
                              settings.queue_poll_interval_s, settings.queue_http_timeout_s,
                              fallback=lock if settings.queue_proceed_if_unreachable else None)
