"""`python -m runner serve` as the web service drives it: JSON job lines on stdin, events on stdout.

Both streams are read by threads into queues, so a check can wait for an event or for a line of
the runner's log (stderr: ACE-Step's own log lines are there too) and act at that moment.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def runner_env(acestep_src: Path, **extra) -> dict:
    """The image's settings for a CPU: the acestep engine, float32, offline hub, the checkout on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACESTEP_") and k != "KEEP_WARM_S"}
    env.update(
        PYTHONPATH=os.pathsep.join([str(acestep_src), str(REPO)]), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
        ACESTEP_ENGINE="acestep", ACESTEP_DEVICE="cpu", ACESTEP_DTYPE="float32", ACESTEP_OFFLOAD="off",
        ACESTEP_INIT_LLM="false", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class ServeRun:
    proc: subprocess.Popen
    events: list = field(default_factory=list)
    stderr: list = field(default_factory=list)
    exited_at: float | None = None
    _out: queue.Queue = field(default_factory=queue.Queue)
    _err: queue.Queue = field(default_factory=queue.Queue)

    @classmethod
    def start(cls, env: dict, idle_timeout: float = 5.0) -> "ServeRun":
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "serve", "--idle-timeout", str(idle_timeout)], cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        run = cls(proc)
        threading.Thread(target=_pump, args=(proc.stdout, run._out), daemon=True).start()
        threading.Thread(target=_pump, args=(proc.stderr, run._err), daemon=True).start()
        return run

    def send(self, command: str, **args) -> None:
        message = {"command": command, **({"args": args} if args else {})}
        self.proc.stdin.write(json.dumps(message, default=str) + "\n")
        self.proc.stdin.flush()

    def close_input(self) -> None:
        self.proc.stdin.close()

    def wait_event(self, predicate, timeout: float) -> dict | None:
        """The first new event that satisfies `predicate`, or None at timeout or end of output."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._drain_err()
            try:
                line = self._out.get(timeout=0.05)
            except queue.Empty:
                continue
            if line is None:
                return None
            event = json.loads(line)
            self.events.append(event)
            if predicate(event):
                return event
        return None

    def wait_log(self, needle: str, timeout: float) -> bool:
        """Wait until the runner's stderr has a line containing `needle`."""
        deadline = time.monotonic() + timeout
        if any(needle in line for line in self.stderr):
            return True
        while time.monotonic() < deadline:
            try:
                line = self._err.get(timeout=0.05)
            except queue.Empty:
                continue
            if line is None:
                return False
            self.stderr.append(line)
            if needle in line:
                return True
        return False

    def sigterm(self) -> float:
        self.proc.send_signal(signal.SIGTERM)
        return time.monotonic()

    def finish(self, timeout: float) -> int:
        """Wait for the exit; collect every remaining event and log line."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.exited_at = time.monotonic()
        self.wait_event(lambda e: False, timeout=1.0)
        self._drain_err(final=True)
        return code

    def _drain_err(self, final: bool = False) -> None:
        deadline = time.monotonic() + (1.0 if final else 0)
        while True:
            try:
                line = self._err.get(timeout=0.05 if final else 0)
            except queue.Empty:
                if not final or time.monotonic() > deadline:
                    return
                continue
            if line is None:
                return
            self.stderr.append(line)


def _pump(stream, sink: queue.Queue) -> None:
    for line in stream:
        sink.put(line.rstrip("\n"))
    sink.put(None)
