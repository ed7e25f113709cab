"""A test double of the gpu-queue-service: a real HTTP server speaking the contract of DESIGN.md section 6.

- a token pool of configurable size; `POST /{lane}/tasks` grants when the tokens are free and
  nobody waits ahead, else queues the session (FIFO) and answers its `position`;
- `GET /{lane}/tasks/{session_id}` answers `processing` or `queued` with the current position;
- `POST /{lane}/task/status` releases a holder (or drops a waiting session) and promotes waiters;
- `GET /health` answers 200.

Every call is recorded with its time (`calls`), and every session's life (`sessions`: asked,
granted, released, release status). `on_release(session_id)` lets a test look at the world at
the very moment a release arrives (e.g. "is the runner process still alive?"); its answer is
stored in the session record. `occupy()` plays another GPU service holding tokens.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class FakeGpuQueue:
    def __init__(self, pool: int = 13000, lane: str = "acestep"):
        self.pool = pool
        self.lane = lane.strip("/")
        self.lock = threading.Lock()
        self.holders: dict[str, int] = {}  # session -> tokens
        self.waiting: deque[tuple[str, int]] = deque()
        self.calls: list[dict] = []
        self.sessions: dict[str, dict] = {}
        self.on_release: Callable[[str], object] | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
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

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-gpu-queue", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ---- what tests drive and read -------------------------------------------------------------

    @property
    def free(self) -> int:
        return self.pool - sum(self.holders.values())

    def occupy(self, session_id: str, tokens: int) -> str:
        """Another service takes tokens (granted or queued like any caller)."""
        with self.lock:
            return self._acquire(session_id, tokens)["status"]

    def vacate(self, session_id: str) -> None:
        """That other service releases its tokens."""
        with self.lock:
            self._release(session_id, "completed")

    def calls_to(self, suffix: str, method: str = "POST") -> list[dict]:
        return [c for c in self.calls if c["method"] == method and c["path"].endswith(suffix)]

    def acquires(self) -> list[dict]:
        return self.calls_to("/tasks", "POST")

    def releases(self) -> list[dict]:
        return self.calls_to("/task/status", "POST")

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
        prefix = f"/{self.lane}/"
        with self.lock:
            if body is None:
                status, answer = 400, {"error": "invalid JSON"}
            elif method == "GET" and path == "/health":
                status, answer = 200, {"status": "ok", "free": self.free}
            elif method == "POST" and path == f"{prefix}tasks":
                status, answer = self._post_task(body, t)
            elif method == "GET" and path.startswith(f"{prefix}tasks/"):
                status, answer = self._get_task(path[len(f"{prefix}tasks/"):])
            elif method == "POST" and path == f"{prefix}task/status":
                status, answer = self._post_status(body, t)
            else:
                status, answer = 404, {"error": "not found"}
            self.calls.append({"t": t, "method": method, "path": path, "body": body, "status": status, "answer": answer})
        data = json.dumps(answer).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def _post_task(self, body: dict, t: float) -> tuple[int, dict]:
        sid, tokens = body.get("session_id"), body.get("tokens")
        if not isinstance(sid, str) or not sid or not isinstance(tokens, int) or tokens <= 0:
            return 400, {"error": "session_id and a positive integer tokens are required"}
        if tokens > self.pool:
            return 400, {"error": f"tokens {tokens} exceed the pool {self.pool}"}
        if sid in self.holders or any(s == sid for s, _ in self.waiting):
            return 409, {"error": "session already known"}
        self.sessions[sid] = {"asked": t, "granted": None, "released": None, "release_status": None,
                              "tokens": tokens, "task_type": body.get("task_type"), "at_release": None}
        return 200, self._acquire(sid, tokens)

    def _acquire(self, sid: str, tokens: int) -> dict:
        self.sessions.setdefault(sid, {"asked": time.time(), "granted": None, "released": None,
                                       "release_status": None, "tokens": tokens, "at_release": None})
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
        known = sid in self.holders or any(s == sid for s, _ in self.waiting)
        if not known:
            return 404, {"error": "unknown session"}
        record = self.sessions.get(sid)
        if record is not None and self.on_release is not None:
            record["at_release"] = self.on_release(sid)
        self._release(sid, status, t)
        return 200, {"ok": True}

    def _release(self, sid: str, status: str, t: float | None = None) -> None:
        self.holders.pop(sid, None)
        self.waiting = deque((s, n) for s, n in self.waiting if s != sid)
        record = self.sessions.get(sid)
        if record is not None:
            record["released"], record["release_status"] = t or time.time(), status
        while self.waiting and self.free >= self.waiting[0][1]:
            nxt, tokens = self.waiting.popleft()
            self.holders[nxt] = tokens
            self.sessions[nxt]["granted"] = time.time()
