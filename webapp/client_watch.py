"""Is the HTTP client of a waiting synchronous call still there? Asked every half second.

The socket gunicorn (or werkzeug) exposes is peeked without consuming anything. A reset
connection is gone. End-of-file is ambiguous: a client that closed its socket and one that only
shut down its sending side (a half-close, after the request) both send FIN, and the second one
still reads the answer. So on end-of-file an HTTP/1.1 client is probed with an interim
`100 Continue` response, which every HTTP/1.1 client must accept and skip before the final
answer: a live half-closed client takes it in silence, a closed one answers with a reset that
the next peek sees. HTTP/1.0 clients may not be sent a 1xx response; for them end-of-file means
gone. Without a raw socket (TLS, the test client) the client is taken to be there.
"""
from __future__ import annotations

import socket
import time

PROBE = b"HTTP/1.1 100 Continue\r\n\r\n"
PROBE_INTERVAL_S = 2.0


class ClientWatch:
    def __init__(self, environ: dict):
        self.sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        self.http11 = environ.get("SERVER_PROTOCOL") == "HTTP/1.1"
        self._probed_at = 0.0
        self.probes = 0

    def gone(self) -> bool:
        if self.sock is None:
            return False
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except (ConnectionError, TimeoutError):
            return True
        except (OSError, ValueError, TypeError):
            return False
        if data:
            return False  # it sent more (a pipelined request): it is there
        if not self.http11:
            return True
        return self._probe()

    def _probe(self) -> bool:
        now = time.monotonic()
        if now - self._probed_at < PROBE_INTERVAL_S:
            return False
        self._probed_at = now
        try:
            self.sock.send(PROBE, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            self.probes += 1
        except BlockingIOError:
            return False  # its receive window is full: it is not reading, but it may still
        except (ConnectionError, OSError):
            return True
        return False
