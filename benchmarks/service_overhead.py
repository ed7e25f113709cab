"""The web service's own overhead around the runner, for a 2-minute upload.

Starts gunicorn the README's way with a stub runner (a minimal script that speaks the runner's
`serve` protocol and copies its source to the output, so generation costs ~nothing) and measures, per
request, what the service adds: parsing the upload, probing/decoding it, queueing, taking GPU
tokens, spawning the runner, and encoding/sending the answer. Both protocols, both token
backends (the lock file and the gpu-queue-service, here its HTTP test double).

    .venv/bin/python benchmarks/service_overhead.py [--repeats 5]

Phase times come from the job's `job_completed` log line; "answer" is what the wall time adds on
top (transfer, base64 for the JSON protocol, polling granularity for it too).
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.gpu_queue import FakeGpuQueue  # noqa: E402

STUB_RUNNER = r'''
import json, os, shutil, sys
def emit(**e): sys.stdout.write(json.dumps(e) + "\n"); sys.stdout.flush()
emit(event="ready", loaded=False)
line = sys.stdin.readline()
if line:
    opt = json.loads(line)["args"]
    for s in ("loading", "encoding", "generating"): emit(event="stage", stage=s)
    emit(event="progress", stage="generating", step=1, total=1)
    for s in ("decoding", "writing"): emit(event="stage", stage=s)
    os.makedirs(opt["out"], exist_ok=True)
    dst = os.path.join(opt["out"], "stem-1.wav")
    shutil.copyfile(opt["source"], dst)
    emit(event="result", outputs=[{"path": dst, "sample_rate": 0, "frames": 0}], seed=1, timings={}, peak_vram_bytes=0)
    emit(event="ready", loaded=True)
'''

PHASES = [("parse", "parse_s"), ("stage upload", "stage_upload_s"), ("ffprobe", "ffprobe_s"), ("decode", "decode_s"),
          ("queue wait", "queue_wait_s"), ("GPU token", "token_wait_s"), ("job to 1st event", "job_to_first_event_s"),
          ("runner process (stub)", "runner_s")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_minute_wav() -> bytes:
    rate, seconds = 48000, 120
    t = np.arange(rate * seconds) / rate
    tone = (0.3 * np.sin(2 * np.pi * 110 * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.stack([tone, tone], axis=1), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def to_mp3(wav: bytes, workdir: Path) -> bytes:
    src, dst = workdir / "bench.wav", workdir / "bench.mp3"
    src.write_bytes(wav)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(src), "-b:a", "192k", str(dst)], check=True)
    return dst.read_bytes()


class Server:
    def __init__(self, workdir: Path, queue_url: str | None, name: str):
        ck = workdir / "checkpoints"
        ck.mkdir(exist_ok=True)
        (ck / "model_index.json").write_text("{}")
        stub = workdir / "stub_runner.py"
        stub.write_text(STUB_RUNNER)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"gunicorn-{name}.log"
        env = {**os.environ, "PORT": str(self.port), "ACESTEP_CHECKPOINTS": str(ck), "DATA_DIR": str(workdir / f"data-{name}"),
               "GPU_LOCK_FILE": str(workdir / "gpu.lock"), "RUNNER_COMMAND": shlex.join([sys.executable, str(stub)]),
               "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", "MAX_UPLOAD_MB": "200", "QUEUE_POLL_INTERVAL_S": "0.05"}
        if queue_url:
            env["QUEUE_URL"] = queue_url
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise RuntimeError(self.log_path.read_text()[-2000:])

    def timings(self, task_id: str) -> dict:
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{") and task_id in line:
                ev = json.loads(line)
                if ev.get("event") == "job_completed" and ev.get("job_id") == task_id:
                    return ev["timings"]
        raise KeyError(task_id)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


def run_sync(server: Server, audio: bytes, filename: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    resp = requests.post(server.url + "/lego", files={"audio_file": (filename, audio)},
                         data={"track_type": "drums", "bpm": "120", "format": "wav"}, timeout=120)
    wall = time.perf_counter() - t0
    resp.raise_for_status()
    return wall, server.timings(resp.headers["X-Task-Id"])


def run_json(server: Server, audio: bytes) -> tuple[float, dict]:
    body = json.dumps({"audio_data": base64.b64encode(audio).decode(), "track_name": "vocals", "bpm": 120,
                       "audio_format": "wav"})
    t0 = time.perf_counter()
    resp = requests.post(server.url + "/lego", data=body, headers={"Content-Type": "application/json"}, timeout=120)
    resp.raise_for_status()
    task = resp.json()["task_id"]
    while True:  # the plugin polls every 1.5 s; polling fast here measures the service, not the plugin
        raw = requests.get(f"{server.url}/lego/status/{task}", timeout=60).content
        if b'"status":"completed"' in raw or b'"status":"failed"' in raw:
            break
        time.sleep(0.01)
    wall = time.perf_counter() - t0  # the client's own JSON/base64 decoding is not the service's cost
    status = json.loads(raw)
    assert status["status"] == "completed", status
    base64.b64decode(status["audio_data"])
    return wall, server.timings(task)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="acestep-bench-") as tmp:
        workdir = Path(tmp)
        wav = two_minute_wav()
        mp3 = to_mp3(wav, workdir)
        fake = FakeGpuQueue().start()
        columns = {}
        try:
            lock_server = Server(workdir, None, "lock")
            http_server = Server(workdir, fake.url, "http")
            cases = {
                "multipart WAV, lock file": lambda: run_sync(lock_server, wav, "a.wav"),
                "multipart MP3, lock file": lambda: run_sync(lock_server, mp3, "a.mp3"),
                "JSON WAV, lock file": lambda: run_json(lock_server, wav),
                "multipart WAV, queue service": lambda: run_sync(http_server, wav, "a.wav"),
                "JSON WAV, queue service": lambda: run_json(http_server, wav),
            }
            for name, case in cases.items():
                case()  # warm-up: first request imports, page cache
                runs = [case() for _ in range(args.repeats)]
                columns[name] = runs
            lock_server.stop()
            http_server.stop()
        finally:
            fake.stop()

    print(f"Service overhead for a 2-minute upload (48 kHz stereo: WAV {len(wav) / 1e6:.1f} MB, MP3 {len(mp3) / 1e6:.1f} MB),"
          f" median of {args.repeats}, seconds; {os.cpu_count()} CPU cores")
    names = list(columns)
    width = 30
    print("| phase |" + "|".join(f" {n} " for n in names) + "|")
    print("|---|" + "---|" * len(names))
    for label, key in PHASES:
        cells = [statistics.median(t.get(key, 0.0) for _, t in columns[n]) for n in names]
        print(f"| {label:<{width}} |" + "|".join(f" {c:.3f} " for c in cells) + "|")
    walls = [statistics.median(w for w, _ in columns[n]) for n in names]
    before_queue = ("parse_s", "stage_upload_s", "probe_s")
    answers = [statistics.median(w - t["total_s"] - sum(t.get(k, 0.0) for k in before_queue) for w, t in columns[n])
               for n in names]
    overheads = [statistics.median(w - t.get("runner_s", 0.0) for w, t in columns[n]) for n in names]
    print(f"| {'answer (transfer, base64, poll)':<{width}} |" + "|".join(f" {c:.3f} " for c in answers) + "|")
    print(f"| {'wall, client side':<{width}} |" + "|".join(f" {c:.3f} " for c in walls) + "|")
    print(f"| {'overhead = wall - runner':<{width}} |" + "|".join(f" **{c:.3f}** " for c in overheads) + "|")
    return 0


if __name__ == "__main__":
    sys.exit(main())
