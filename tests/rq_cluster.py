"""A multi-host deployment on one machine, for the RQ tests: a real redis-server, GPU workers
(`python -m webapp.worker`) that share nothing but that Redis (each its own DATA_DIR, its own
gpu-queue-service double and its own runner log, as separate hosts would have), and gunicorn
with several workers serving the web tier, started the README's way.

The runner is tests/fakes/fake_runner.py (its per-job `fake-mode:` caption picks hang, fail...):
what is tested here is the queue around it. Every fake queue checks, at each release, whether
the runner of that job is still alive (`TokenWatch`).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from conftest import ROOT, fake_runner_command, free_port, pid_alive, wait_for
from harness import read_log_events, terminate
from tests.fakes.gpu_queue import FakeGpuQueue

GUNICORN = ROOT / ".venv" / "bin" / "gunicorn"
TASK_RE = re.compile(r"[0-9a-f]{32}")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def runner_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TokenWatch:
    """At each release on a fake queue: which runner processes of that job are still alive."""

    def __init__(self, queue: FakeGpuQueue, record: Path):
        self.queue = queue
        self.record = record
        queue.on_release = self._alive_at_release

    def runner_pids(self, task_id: str) -> list[int]:
        return [r["pid"] for r in runner_records(self.record) if "start" in r and task_id in r["args"]["source"]]

    def _alive_at_release(self, session_id: str) -> list[int]:
        match = TASK_RE.search(session_id)
        return [pid for pid in self.runner_pids(match.group(0)) if pid_alive(pid)] if match else []

    def check(self, settle_s: float = 20.0) -> int:
        """Every acquire released exactly once, none while its runner lived; returns the job count.
        A completed job is answered once its stem is written; its runner's exit and the release
        follow within moments, so the counts are given `settle_s` to meet."""
        deadline = time.monotonic() + settle_s
        while len(self.queue.releases()) < len(self.queue.acquires()) and time.monotonic() < deadline:
            time.sleep(0.05)
        acquires, releases = self.queue.acquires(), self.queue.releases()
        granted = [c["body"]["session_id"] for c in acquires]
        released = [c["body"]["session_id"] for c in releases if c["status"] == 200]
        assert sorted(granted) == sorted(released), (granted, released)
        for sid in granted:
            assert self.queue.sessions[sid]["at_release"] == [], f"{sid}: runner alive when its tokens were released"
        return len(granted)


@dataclass
class GpuHost:
    """One GPU worker process and what is its own: data folder, token service, runner log."""

    index: int
    base: Path
    env: dict
    queue: FakeGpuQueue
    record: Path
    log_path: Path
    proc: subprocess.Popen | None = None
    logs: list = field(default_factory=list)

    def start(self) -> "GpuHost":
        log = open(self.log_path, "ab")
        self.logs.append(log)
        self.proc = subprocess.Popen([sys.executable, "-m", "webapp.worker"], cwd=ROOT, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)
        return self

    @property
    def data_dir(self) -> Path:
        return Path(self.env["DATA_DIR"])

    @property
    def name(self) -> str | None:
        try:
            return json.loads((self.data_dir / "gpu-worker.json").read_text())["name"]
        except (OSError, ValueError, KeyError):
            return None

    def events(self, name: str | None = None) -> list[dict]:
        return read_log_events(self.log_path, name)

    def jobs_started(self) -> list[str]:
        return [TASK_RE.search(r["args"]["source"]).group(0) for r in runner_records(self.record) if "start" in r]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for log in self.logs:
            log.close()
        self.logs.clear()
        return None if self.proc is None else self.proc.returncode


class WebServer:
    """gunicorn the README's way, on a port it keeps across restarts."""

    def __init__(self, env: dict, log_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env, "PORT": str(self.port), "LOG_FORMAT": "json"}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> "WebServer":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(self._answers, timeout=60, interval=0.2, what="gunicorn to answer /health")
        return self

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited: {self.log_path.read_text()[-3000:]}")
        try:
            return requests.get(self.url + "/health", timeout=5).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    def events(self, name: str | None = None) -> list[dict]:
        return read_log_events(self.log_path, name)

    def stop(self, timeout: float = 40) -> int | None:
        if self.proc is not None:
            terminate(self.proc, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return None if self.proc is None else self.proc.returncode


class Cluster:
    """Redis, GPU hosts and a web tier; `hosts[i]` are separate machines in all but name."""

    def __init__(self, base: Path, redis_server, checkpoints: Path, gpu_hosts: int = 2, web_workers: int = 2,
                 step_s: float = 0.3, lost_after_s: float = 8.0, extra_env: dict | None = None,
                 runner_command: str | None = None, token_service: bool = True):
        """`runner_command` replaces the fake runner (benchmarks: a stub, or the real runner);
        without `token_service` each host serialises its GPU with its own lock file."""
        self.base = base
        self.redis = redis_server
        self.common = {"REDIS_URL": redis_server.url, "LEGO_STEPS": "8", "LEGO_MIN_STEPS": "2", "LOG_LEVEL": "INFO",
                       "LOG_FORMAT": "json", "WORKER_LOST_AFTER_S": str(lost_after_s), "RUNNER_KILL_GRACE_S": "2",
                       **(extra_env or {})}
        self.hosts: list[GpuHost] = []
        for i in range(gpu_hosts):
            queue = FakeGpuQueue(pool=13000).start()
            record = base / f"gpu{i}-runner.jsonl"
            env = {**os.environ, **self.common, "DATA_DIR": str(base / f"gpu{i}-data"), "ACESTEP_CHECKPOINTS": str(checkpoints),
                   "GPU_LOCK_FILE": str(base / f"gpu{i}.lock"), "QUEUE_POLL_INTERVAL_S": "0.1",
                   "RUNNER_COMMAND": runner_command or fake_runner_command(step_s=step_s, record=record)}
            if token_service:
                env["QUEUE_URL"] = queue.url
            self.hosts.append(GpuHost(i, base, env, queue, record, base / f"gpu{i}.log"))
        self.watches = [TokenWatch(h.queue, h.record) for h in self.hosts]
        self.web = WebServer({**self.common, "DATA_DIR": str(base / "web-data"), "WEB_WORKERS": str(web_workers)},
                             base / "web.log")

    def start(self) -> "Cluster":
        try:
            for host in self.hosts:
                host.start()
            self.web.start()
            self.wait_workers(len(self.hosts))
        except BaseException:
            self.stop()
            raise
        return self

    def wait_workers(self, count: int, timeout: float = 60) -> None:
        def alive():
            health = requests.get(self.web.url + "/health", timeout=5).json()
            return health.get("queue", {}).get("workers_alive") == count

        wait_for(alive, timeout=timeout, interval=0.2, what=f"{count} GPU workers alive")

    def stop(self) -> None:
        self.web.stop()
        for host in self.hosts:
            host.stop()
            host.queue.stop()
        # A test that failed half-way may have left a runner its worker no longer owns: end the
        # runners these hosts started (by pid, each checked to be that very runner).
        for host in self.hosts:
            for pid in {r["pid"] for r in runner_records(host.record) if "spawn" in r}:
                if pid_alive(pid) and str(host.record) in _cmdline(pid):
                    os.kill(pid, signal.SIGKILL)

    def check_tokens(self) -> int:
        return sum(w.check() for w in self.watches)


def poll(url: str, task_id: str, timeout: float = 60, interval: float = 0.15) -> tuple[dict, list[dict]]:
    """Poll like the plugin, a new connection each time (so any web worker may answer)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = requests.get(f"{url}/lego/status/{task_id}", timeout=10, headers={"Connection": "close"}).json()
        seen.append(body)
        if body.get("status") in ("completed", "failed"):
            return body, seen
        time.sleep(interval)
    raise AssertionError(f"task {task_id} did not end within {timeout} s; last: {seen[-1] if seen else None}")
