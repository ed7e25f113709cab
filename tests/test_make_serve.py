"""`make serve`'s script (scripts/serve.sh) as a newcomer meets it (issue 14 item 5): a taken port
says which variable to change, and a ready service prints its URL and a request that works as pasted."""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess

import pytest
import soundfile as sf

from conftest import ROOT, free_port, wait_for

pytestmark = pytest.mark.slow


def serve_env(tmp_path, tiny_checkpoint, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACESTEP_")}
    env.update(PORT=str(port), ACESTEP_CHECKPOINTS=str(tiny_checkpoint), DATA_DIR=str(tmp_path / "data"),
               GPU_LOCK_FILE=str(tmp_path / "gpu.lock"), LEGO_STEPS="2", LEGO_MIN_STEPS="1", ACESTEP_DEVICE="cpu")
    return env


def test_a_taken_port_says_which_variable_to_change(tmp_path, tiny_checkpoint):
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = subprocess.run(["bash", "scripts/serve.sh"], cwd=ROOT, env=serve_env(tmp_path, tiny_checkpoint, port),
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"port {port} is taken" in proc.stderr and f"PORT={port + 1} make serve" in proc.stderr, proc.stderr
    assert "Can't connect" not in proc.stderr and "gunicorn" not in proc.stderr.lower()


def test_a_ready_service_prints_a_request_that_works_as_pasted(tmp_path, tiny_checkpoint):
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "scripts/serve.sh"], cwd=ROOT, env=serve_env(tmp_path, tiny_checkpoint, port),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "try it" in log.read_text(errors="replace") or proc.poll() is not None, timeout=180,
                 interval=0.3, what="make serve's hint")
        text = log.read_text(errors="replace")
        assert f"ready at http://localhost:{port}/" in text and f"the page (in a browser): http://localhost:{port}/" in text, text[-2000:]
        curl_line = next(line.strip() for line in text.splitlines() if line.strip().startswith("curl "))
        argv = shlex.split(curl_line)
        run = subprocess.run([argv[0], "--silent", "--show-error", "--fail-with-body", *argv[1:]], cwd=tmp_path,
                             capture_output=True, timeout=600)
        assert run.returncode == 0, (curl_line, run.stderr[-500:], run.stdout[-1000:])
        info = sf.info(str(tmp_path / "stem.wav"))
        assert info.samplerate == 44100 and info.frames == 4 * 44100 and info.channels == 2
    finally:
        proc.send_signal(signal.SIGTERM)  # after exec, the script's pid is gunicorn's master
        proc.wait(timeout=90)


def test_an_older_demo_folder_is_named_with_how_to_rebuild_it(tmp_path, tiny_checkpoint):
    """serve.sh keeps an existing demo folder (another service of the checkout may use it), but one
    built by an older tiny model says so, and how to rebuild it (scripts/demo_current.py)."""
    import json
    import sys

    from runner.layout import DEMO_FORMAT, DEMO_MARKER, demo_format

    def check(folder):
        return subprocess.run([sys.executable, "scripts/demo_current.py", str(folder)], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    assert demo_format(tiny_checkpoint) == DEMO_FORMAT  # what make-tiny-checkpoint writes now
    current = check(tiny_checkpoint)
    assert current.returncode == 0 and current.stderr == ""
    older = tmp_path / "demo-checkpoint"
    older.mkdir()
    (older / DEMO_MARKER).write_text(json.dumps({"size": "tiny", "seed": 0, "note": "random weights, not ACE-Step"}))
    stale = check(older)
    assert stale.returncode == 1 and f"format 1, now {DEMO_FORMAT}" in stale.stderr and f"rm -rf {older}" in stale.stderr
    assert check(tmp_path / "no-marker").returncode == 0  # not a demo folder: nothing to say
