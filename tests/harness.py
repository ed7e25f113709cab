"""The service started the README's way, `gunicorn -c gunicorn.conf.py wsgi:app`, for the end-to-end
and fault tests: its JSON log read back as events, its worker found for a SIGKILL, and the check the
gpu-queue-service double runs at every release ("is a runner of this job still alive?")."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import requests

from conftest import ROOT, free_port, pid_alive, wait_for


def read_log_events(path: Path, name: str | None = None) -> list[dict]:
    """The JSON lines of a service's log (all, or those of one event), skipping the text lines."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if name is None or ev.get("event") == name:
                out.append(ev)
    return out


GUNICORN = ROOT / ".venv" / "bin" / "gunicorn"


class Gunicorn:
    def __init__(self, env: dict, log_path: Path, port: int | None = None, wait: bool = True):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, **env, "PORT": str(self.port), "LOG_FORMAT": "json"}
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, env=full_env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout: float = 60) -> None:
        wait_for(self._healthy, timeout=timeout, interval=0.2, what="gunicorn to answer /health")

    def _healthy(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited: {self.log_path.read_text()[-3000:]}")
        try:
            return requests.get(self.url + "/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def events(self, name: str | None = None) -> list[dict]:
        return read_log_events(self.log_path, name)

    def runner_pids(self, task_id: str) -> list[int]:
        """Every runner process that started a run of this job (from the `job_runner_started` lines)."""
        return [e["pid"] for e in self.events("job_runner_started") if e.get("job_id") == task_id]

    def workers(self) -> list[int]:
        """The master's live children: its worker(s)."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == self.proc.pid and stat[0] not in ("Z", "X"):
                out.append(int(entry.name))
        return out

    def worker(self) -> int:
        return wait_for(lambda: (self.workers() or [None])[0], timeout=30, what="the gunicorn worker")

    def stop(self, timeout: float = 60) -> int:
        terminate(self.proc, timeout)
        self.log.close()
        return self.proc.returncode


def terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, as an operator stops a service; SIGKILL if it is still there after `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def runner_alive_check(servers: list[Gunicorn]):
    """For FakeGpuQueue.on_release: the runners of the session's job, and which of them are alive now.
    The session id is `acestep-lego-<task>-<n>`; the job's runner pids come from the service's log."""

    def check(session_id: str) -> dict:
        task = session_id.split("-")[2]
        pids = [pid for server in servers for pid in server.runner_pids(task)]
        return {"checked": pids, "alive": [p for p in pids if pid_alive(p)]}

    return check


def assert_released_after_exit(fake_queue, task_ids: list[str], servers: list[Gunicorn]) -> None:
    """Every session of these jobs released exactly once; every runner of the job started before that
    release was checked, and found gone, at the very moment the release took effect."""
    for task in task_ids:
        sids = fake_queue.sids_of(task)
        assert sids, f"job {task} never asked for GPU tokens"
        for sid in sids:
            session = fake_queue.sessions[sid]
            assert session["effective_releases"] == 1, (sid, session)
            seen = session["at_release"]
            assert seen is not None and seen["alive"] == [], f"{sid}: runner alive at its release: {seen}"
            started_before = [e["pid"] for server in servers for e in server.events("job_runner_started")
                              if e.get("job_id") == task and e["started_at"] <= session["released"]]
            assert set(started_before) <= set(seen["checked"]), (sid, started_before, seen)
