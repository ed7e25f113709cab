"""Memory of the gunicorn worker while it takes the plugin's JSON protocol with a large body.

Starts the service the README's way on the fake runner, posts JSON bodies of growing size (the
base64 of a real WAV, as the plugin sends it) and prints, for each, the worker's peak resident
memory (VmHWM, read from /proc) before and after the request, with the answer's status. The
body is read as a stream (webapp/json_body.py), so the growth should stay near a megabyte
whatever the body's size, where buffering the body would cost about 2.7 times its size.

    .venv/bin/python benchmarks/json_body_memory.py [--sizes-mb 10,50,100]
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def worker_of(master: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == master:
                    return int(entry.name)
            except (OSError, IndexError, ValueError):
                pass
    raise RuntimeError("no worker")


def wav_of_mb(mb: float) -> bytes:
    rate = 48000
    frames = int(mb * 1e6 / 4)  # 16-bit stereo
    t = np.arange(frames) / rate
    tone = (0.3 * np.sin(2 * np.pi * 110 * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.stack([tone, tone], axis=1), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes-mb", default="10,50,100", help="JSON body sizes in MB")
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="acestep-json-mem-"))
    ck = work / "checkpoints"
    ck.mkdir()
    (ck / "model_index.json").write_text("{}")
    port = free_port()
    env = {**os.environ, "PORT": str(port), "ACESTEP_CHECKPOINTS": str(ck), "DATA_DIR": str(work / "data"),
           "GPU_LOCK_FILE": str(work / "gpu.lock"), "MAX_UPLOAD_MB": "200", "MAX_DURATION_S": "900",
           "MAX_DECODED_MB": "2000", "LOG_LEVEL": "WARNING", "RUNNER_PRESTART": "false",
           "RUNNER_COMMAND": shlex.join([sys.executable, str(ROOT / "tests" / "fakes" / "fake_runner.py")])}
    log = open(work / "gunicorn.log", "wb")
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        worker = worker_of(proc.pid)
        print(f"{'body MB':>8} {'audio MB':>9} {'HWM before MB':>14} {'HWM after MB':>13} {'growth MB':>10} {'x body':>7}  answer")
        for size in [float(x) for x in opts.sizes_mb.split(",")]:
            audio = wav_of_mb(size * 3 / 4)
            body = json.dumps({"audio_data": base64.b64encode(audio).decode(), "track_name": "drums", "bpm": 100}).encode()
            before = vm_hwm_kb(worker)
            resp = requests.post(url + "/lego", data=body, headers={"Content-Type": "application/json"}, timeout=600)
            after = vm_hwm_kb(worker)
            growth = (after - before) / 1024
            print(f"{len(body) / 1e6:8.1f} {len(audio) / 1e6:9.1f} {before / 1024:14.1f} {after / 1024:13.1f} "
                  f"{growth:10.1f} {growth * 1048576 / len(body):7.3f}  {resp.status_code} {resp.json().get('status')}")
            del audio, body
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
