"""The real runner (`python -m runner serve`) cannot outlive the service that started it
(runner/lifeline.py): its stdin closing during a job, or its parent dying while stdin stays open,
ends it as a cancel does (exit 5, nothing written)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import PYTHON, REPO, pid_alive, runner_env, wait_for, write_tone

pytestmark = pytest.mark.slow


def job_line(tmp_path, tiny_checkpoint, steps=200) -> bytes:
    src = write_tone(tmp_path / "s.wav", 6.0)
    out = tmp_path / "out"
    out.mkdir()
    return (json.dumps({"command": "lego", "args": {"source": str(src), "track": "drums", "bpm": 90, "steps": steps,
                                                    "checkpoints": str(tiny_checkpoint), "out": str(out),
                                                    "device": "cpu"}}) + "\n").encode()


def events_until(stream, kind: str) -> list[dict]:
    seen = []
    for raw in stream:
        seen.append(json.loads(raw))
        if seen[-1]["event"] == kind:
            return seen
    raise AssertionError(f"the runner ended before a {kind!r} event: {seen}")


def test_stdin_closing_during_a_job_cancels_it(tmp_path, tiny_checkpoint):
    proc = subprocess.Popen([PYTHON, "-m", "runner", "serve", "--idle-timeout", "0"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO, env=runner_env())
    events_until(proc.stdout, "ready")
    proc.stdin.write(job_line(tmp_path, tiny_checkpoint))
    proc.stdin.flush()
    events_until(proc.stdout, "progress")  # mid-job: nobody reads stdin now
    proc.stdin.close()  # the service is gone
    rest = [json.loads(line) for line in proc.stdout]
    assert proc.wait(60) == 5
    assert [e["code"] for e in rest if e["event"] == "error"] == ["cancelled"]
    assert not [e for e in rest if e["event"] == "result"]
    assert list((tmp_path / "out").iterdir()) == []  # nothing written


def test_the_parents_death_ends_it_even_with_stdin_open(tmp_path, tiny_checkpoint):
    """A parent that starts the runner and dies (SIGKILL); this test keeps the runner's stdin open,
    so only the parent-death watches can end it."""
    read_fd, write_fd = os.pipe()
    parent = tmp_path / "parent.py"
    parent.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        runner = subprocess.Popen({[PYTHON, "-m", "runner", "serve", "--idle-timeout", "0"]!r}, stdin={read_fd},
                                  stdout=open({str(tmp_path / "events.jsonl")!r}, "w"), stderr=subprocess.DEVNULL,
                                  cwd={str(REPO)!r}, pass_fds=({read_fd},))
        print(runner.pid, flush=True)
        time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(parent)], stdout=subprocess.PIPE, pass_fds=(read_fd,), env=runner_env())
    os.close(read_fd)
    runner_pid = int(proc.stdout.readline())
    events = tmp_path / "events.jsonl"
    wait_for(lambda: events.exists() and '"ready"' in events.read_text(), timeout=120, what="the runner to be ready")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not pid_alive(runner_pid), timeout=30, what="the runner to end with its parent")
    last = [json.loads(line) for line in events.read_text().splitlines()][-1]
    assert last["event"] == "error" and last["code"] == "cancelled" and last["exit_status"] == 5
    os.close(write_fd)
