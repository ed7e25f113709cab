"""A test double of the gpu-queue-service: a real HTTP server speaking its contract, strictly.

- a token pool of configurable size; `POST {lane}tasks` grants when the tokens are free and
  nobody waits ahead, else queues the session (FIFO) and answers its `position`; a session it
  already knows is refused (409);
- `GET {lane}tasks/{session_id}` answers `processing` or `queued` with the current position,
  404 for a session it does not know;
- `POST {lane}task/status` releases a holder (or drops a waiting session) and promotes waiters;
  a session it does not know is 404 (released already, or never registered);
- `GET /health` answers 200. The lane is empty by default: `POST /tasks`, the seed's paths.

Strict: every call is recorded with its time and answer (`calls`), every session's life too
(`sessions`: asked, granted, every release attempt and the one that took effect), so a test can
check "released exactly once, after its runner exited". `on_release(session_id)` looks at the
world at the very moment a release takes effect (e.g. "is the runner still alive?").

Faults, as an operator's bad day brings them, armed per kind of call ("acquire", "poll",
"release") with `inject(kind, behaviour, times)`:
- "garbage": 200 with an HTML page (a proxy's), nothing changes;
- "error:<status>": that status with a JSON error, nothing changes;
- "json:<body>": 200 with that JSON body (e.g. an unknown status), nothing changes;
- "slow:<seconds>": the call takes effect, but only after that delay (the client may give up);
- "drop": the call takes effect, then the connection is closed without an answer.
`stop()` then `start()` plays the service killed and started again: its state survives, as the
real one keeps it in Redis. `occupy()` plays another GPU service holding tokens.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class FakeGpuQueue:
    def __init__(self, pool: int = 13000, lane: str = ""):
        self.pool = pool
        self.lane = lane.strip("/")
        self.prefix = f"/{self.lane}/" if self.lane else "/"
        self.lock = threading.Lock()
        self.holders: dict[str, int] = {}  # session -> tokens
        self.waiting: deque[tuple[str, int]] = deque()
        self.calls: list[dict] = []
        self.sessions: dict[str, dict] = {}
        self.on_release: Callable[[str], object] | None = None
        self.faults: dict[str, deque[str]] = {"acquire": deque(), "poll": deque(), "release": deque()}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.url = ""

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "FakeGpuQueue":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                fake._handle(self, "GET")

            def do_POST(self):
                fake._handle(self, "POST")

        class Server(ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

        self._server = Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-gpu-queue", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """The service goes down (its state stays, as Redis keeps it)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def inject(self, kind: str, behaviour: str, times: int = 1) -> None:
        assert kind in self.faults, kind
        with self.lock:
            self.faults[kind].extend([behaviour] * times)

    # ---- what tests drive and read -------------------------------------------------------------

    @property
    def free(self) -> int:
        return self.pool - sum(self.holders.values())

    def occupy(self, session_id: str, tokens: int) -> str:
        """Another service takes tokens (granted or queued like any caller)."""
        with self.lock:
            self.sessions[session_id] = self._new_session(time.time(), tokens, "other")
            return self._acquire(session_id, tokens)["status"]

    def vacate(self, session_id: str) -> None:
        """That other service releases its tokens."""
        with self.lock:
            self._release(session_id, "completed", time.time())

    def calls_to(self, suffix: str, method: str = "POST") -> list[dict]:
        return [c for c in self.calls if c["method"] == method and c["path"].endswith(suffix)]

    def acquires(self) -> list[dict]:
        return [c for c in self.calls_to("/tasks", "POST") if c["status"] == 200]

    def releases(self) -> list[dict]:
        """Releases that took effect (the service knew the session and let it go)."""
        return [c for c in self.calls_to("/task/status", "POST") if c["status"] == 200]

    def release_attempts(self) -> list[dict]:
        return self.calls_to("/task/status", "POST")

    def ours(self, prefix: str = "acestep-lego-") -> dict[str, dict]:
        return {sid: s for sid, s in self.sessions.items() if sid.startswith(prefix)}

    def sids_of(self, task_id: str) -> list[str]:
        """The sessions of a job (one per run: `acestep-lego-<task>-<random>`)."""
        return [sid for sid in list(self.sessions) if sid.startswith(f"acestep-lego-{task_id}-")]

    def sid_of(self, task_id: str) -> str | None:
        """The one session of a job that ran once (None before it asked)."""
        sids = self.sids_of(task_id)
        assert len(sids) <= 1, sids
        return sids[0] if sids else None

    def session_of(self, task_id: str) -> dict:
        return self.sessions[self.sid_of(task_id)]

    def problems(self, prefix: str = "acestep-lego-") -> list[str]:
        """What breaks "every registered session released exactly once, with no runner alive at that
        moment" for the sessions whose id starts with `prefix` (the service's); [] when all is well."""
        out = []
        with self.lock:
            for sid, s in self.sessions.items():
                if not sid.startswith(prefix):
                    continue
                if s["effective_releases"] != 1:
                    out.append(f"{sid}: released {s['effective_releases']} times")
                if sid in self.holders or any(w == sid for w, _ in self.waiting):
                    out.append(f"{sid}: still held or queued")
                seen = s["at_release"]
                alive = seen.get("alive") if isinstance(seen, dict) else seen
                if alive:
                    out.append(f"{sid}: at its release these were alive: {alive}")
        return out

    # ---- the contract --------------------------------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        t = time.time()
        length = int(req.headers.get("Content-Length") or 0)
        raw = req.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = None
        path = req.path.split("?")[0]
        kind = self._kind(method, path)
        fault = None
        if kind is not None:
            with self.lock:
                fault = self.faults[kind].popleft() if self.faults[kind] else None
        if fault == "garbage":
            return self._answer(req, t, method, path, body, 200, b"<html><body>Bad gateway, probably</body></html>",
                                "text/html", fault)
        if fault and fault.startswith("error:"):
            return self._answer(req, t, method, path, body, int(fault[6:]), json.dumps({"error": "injected"}).encode(),
                                "application/json", fault)
        if fault and fault.startswith("json:"):
            return self._answer(req, t, method, path, body, 200, fault[5:].encode(), "application/json", fault)
        if fault and fault.startswith("slow:"):
            time.sleep(float(fault[5:]))
        status, answer = self._apply(method, path, body, t)
        if fault == "drop":
            with self.lock:
                self.calls.append({"t": t, "method": method, "path": path, "body": body, "status": status,
                                   "answer": answer, "fault": fault})
            req.close_connection = True
            try:
                req.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._answer(req, t, method, path, body, status, json.dumps(answer).encode(), "application/json", fault, answer)

    def _kind(self, method: str, path: str) -> str | None:
        if method == "POST" and path == f"{self.prefix}tasks":
            return "acquire"
        if method == "GET" and path.startswith(f"{self.prefix}tasks/"):
            return "poll"
        if method == "POST" and path == f"{self.prefix}task/status":
            return "release"
        return None

    def _apply(self, method: str, path: str, body, t: float) -> tuple[int, dict]:
        with self.lock:
            if body is None:
                return 400, {"error": "invalid JSON"}
            if method == "GET" and path == "/health":
                return 200, {"status": "ok", "free": self.free}
            kind = self._kind(method, path)
            if kind == "acquire":
                return self._post_task(body, t)
            if kind == "poll":
                return self._get_task(path[len(f"{self.prefix}tasks/"):])
            if kind == "release":
                return self._post_status(body, t)
            return 404, {"error": "not found"}

    def _answer(self, req, t, method, path, body, status, data: bytes, ctype: str, fault=None, answer=None) -> None:
        with self.lock:
            self.calls.append({"t": t, "method": method, "path": path, "body": body, "status": status,
                               "answer": answer, "fault": fault})
        try:
            req.send_response(status)
            req.send_header("Content-Type", ctype)
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            req.wfile.write(data)
        except OSError:
            pass  # the client gave up (a slow answer): the call took effect all the same

    @staticmethod
    def _new_session(t: float, tokens: int, task_type) -> dict:
        return {"asked": t, "granted": None, "released": None, "release_status": None, "tokens": tokens,
                "task_type": task_type, "at_release": None, "release_attempts": 0, "effective_releases": 0}

    def _post_task(self, body: dict, t: float) -> tuple[int, dict]:
        sid, tokens = body.get("session_id"), body.get("tokens")
        if not isinstance(sid, str) or not sid or not isinstance(tokens, int) or tokens <= 0:
            return 400, {"error": "session_id and a positive integer tokens are required"}
        if tokens > self.pool:
            return 400, {"error": f"tokens {tokens} exceed the pool {self.pool}"}
        if sid in self.sessions:
            return 409, {"error": "session already known"}
        self.sessions[sid] = self._new_session(t, tokens, body.get("task_type"))
        return 200, self._acquire(sid, tokens)

    def _acquire(self, sid: str, tokens: int) -> dict:
        if not self.waiting and self.free >= tokens:
            self.holders[sid] = tokens
            self.sessions[sid]["granted"] = time.time()
            return {"status": "processing", "session_id": sid}
        self.waiting.append((sid, tokens))
        return {"status": "queued", "session_id": sid, "position": len(self.waiting)}

    def _get_task(self, sid: str) -> tuple[int, dict]:
        if sid in self.holders:
            return 200, {"status": "processing", "session_id": sid}
        for i, (s, _) in enumerate(self.waiting):
            if s == sid:
                return 200, {"status": "queued", "session_id": sid, "position": i + 1}
        return 404, {"error": "unknown session"}

    def _post_status(self, body: dict, t: float) -> tuple[int, dict]:
        sid, status = body.get("session_id"), body.get("status")
        if status not in ("completed", "failed"):
            return 400, {"error": "status must be completed or failed"}
        record = self.sessions.get(sid)
        if record is not None:
            record["release_attempts"] += 1
        known = sid in self.holders or any(s == sid for s, _ in self.waiting)
        if not known:
            return 404, {"error": "unknown session"}
        if record is not None and self.on_release is not None:
            record["at_release"] = self.on_release(sid)
        self._release(sid, status, t)
        return 200, {"ok": True}

    def _release(self, sid: str, status: str, t: float) -> None:
        self.holders.pop(sid, None)
        self.waiting = deque((s, n) for s, n in self.waiting if s != sid)
        record = self.sessions.get(sid)
        if record is not None:
            record["released"], record["release_status"] = t, status
            record["effective_releases"] += 1
        while self.waiting and self.free >= self.waiting[0][1]:
            nxt, tokens = self.waiting.popleft()
            self.holders[nxt] = tokens
            self.sessions[nxt]["granted"] = time.time()
