"""A real `redis-server` (Debian's, installed by scripts/system-deps.sh) for the RQ tests.

Each instance listens on its own free port on 127.0.0.1 and keeps its data in its own folder with
the append-only file on and synced at every write, as docker-compose.example.yml runs it, so a
test can kill it (SIGKILL included) and start it again on the same port and folder and find
every acknowledged write.
"""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, folder: Path, fsync: str = "always"):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/system-deps.sh (make test does)")
        self.folder = Path(folder)
        self.fsync = fsync  # appendfsync: "always" as deployed; benchmarks also measure "everysec"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout_s: float = 20.0) -> "RedisServer":
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                "--appendonly", "yes", "--appendfsync", self.fsync, "--save", "", "--daemonize", "no",
                "--protected-mode", "yes", "--loglevel", "warning"]
        self._log = open(self.folder / "redis.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.folder / 'redis.log').read_text()[-2000:]}")
            try:
                if client.ping():
                    return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING in time")
            time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop it the hard way (SIGKILL) or politely (SIGTERM: it writes everything out first)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, sig: int = signal.SIGKILL) -> "RedisServer":
        self.kill(sig)
        return self.start()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
