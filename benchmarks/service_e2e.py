"""The service end to end on a GPU, against the runner's own time: what the web layer adds.

Starts gunicorn the README's way on a real checkpoint (on a GPU machine: the full-size random
one that benchmarks/gpu_bench.py builds), sends the same multipart request several times, one
after another, each once the service is idle again (its next runner started ahead and ready),
and prints, per request, the client's wall time beside the runner's own time for the job
(load + encode + steps + decode + write, from the job's `job_completed` log line).

    python benchmarks/service_e2e.py --checkpoints bench-out/full-random --seconds 120 [--keep-warm 60]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.gpu_bench import make_source  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--seconds", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep-warm", type=float, default=0.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--offload", default="off")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="e2e-"))
    source = make_source(work, args.seconds)
    port = free_port()
    env = dict(os.environ, PORT=str(port), ACESTEP_CHECKPOINTS=str(args.checkpoints.resolve()), DATA_DIR=str(work / "data"),
               ACESTEP_DEVICE=args.device, ACESTEP_DTYPE=args.dtype, ACESTEP_OFFLOAD=args.offload,
               KEEP_WARM_S=str(args.keep_warm), LOG_FORMAT="json", GPU_LOCK_FILE=str(work / "gpu.lock"),
               LEGO_STEPS=str(args.steps), LEGO_MIN_STEPS=str(min(20, args.steps)), HF_HUB_OFFLINE="1")
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    completed: dict[str, dict] = {}

    def read_log():
        for line in server.stderr:
            if line.startswith("{") and '"job_completed"' in line:
                record = json.loads(line)
                completed[record["job_id"]] = record

    threading.Thread(target=read_log, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for _ in range(600):
            try:
                if requests.get(base + "/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        for attempt in range(args.repeats):
            ready_wait = time.perf_counter()
            while True:  # the service is idle again: a runner started ahead has its imports done (or a model is warm)
                warm = requests.get(base + "/health", timeout=5).json()["jobs"]["warm"]
                if warm.get("loaded") or warm.get("spare_ready"):
                    break
                time.sleep(0.1)
            ready_wait = time.perf_counter() - ready_wait
            started = time.perf_counter()
            with open(source, "rb") as fh:
                resp = requests.post(base + "/lego", files={"audio_file": ("src.wav", fh, "audio/wav")},
                                     data={"track_type": "vocals", "bpm": "120", "format": "wav", "seed": "1"}, timeout=900)
            wall = time.perf_counter() - started
            resp.raise_for_status()
            task = resp.headers["X-Task-Id"]
            for _ in range(100):
                if task in completed:
                    break
                time.sleep(0.05)
            record = completed[task]
            runner = record.get("runner_timings") or {}
            runner_total = runner.get("total_s", 0.0)
            rows.append({"request": attempt + 1, "waited_for_idle_s": round(ready_wait, 2), "wall_s": round(wall, 3),
                         "runner_total_s": runner_total, "service_adds_s": round(wall - runner_total, 3),
                         "ratio": round(wall / runner_total, 3) if runner_total else None,
                         "runner": runner, "service": record.get("timings")})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"\nkeep_warm={args.keep_warm} source={args.seconds}s dtype={args.dtype} offload={args.offload}")
    print("request  wall_s  runner_s  service_adds_s  ratio")
    for row in rows:
        print(f"{row['request']:7}  {row['wall_s']:6}  {row['runner_total_s']:8}  {row['service_adds_s']:14}  {row['ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
