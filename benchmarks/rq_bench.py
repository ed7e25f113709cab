"""The multi-host (RQ) mode measured: what the Redis path adds to a job, and jobs per minute with
one and two GPU workers.

    .venv/bin/python benchmarks/rq_bench.py overhead [--repeats 5]
    .venv/bin/python benchmarks/rq_bench.py throughput [--jobs 6 --workers 1,2]

`overhead`: the same 2-minute upload through the same stub runner (benchmarks/service_overhead.py's:
it copies its source to its output, so generation costs nothing) on the one-host service
(gunicorn, in-process queue) and on the RQ mode (gunicorn web tier, one `python -m webapp.worker`,
a real redis-server), both protocols. The difference of the medians is what the Redis path adds;
the RQ phases (upload to Redis, wait for a worker, fetch on the GPU host, stem to Redis) come
from the job's record.

`throughput`: the real runner on the tiny random checkpoint (CPU), N jobs submitted at once to
one, then two GPU workers (each its own data folder and lock file: two "GPUs" sharing only Redis),
after a warm-up job per worker. Jobs per minute = N / (last completion - first submit).

Both print their proof first (jobs counted, every stem decoded and its length checked), then the
figures. Each GPU worker's runner is limited to one CPU thread (OMP_NUM_THREADS=1), so on a
machine with C cores the workers scale until C are busy.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks.service_overhead import STUB_RUNNER, Server, to_mp3, two_minute_wav  # noqa: E402,F401
from rq_cluster import Cluster  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402
from webapp.queue_rq.connection import connect  # noqa: E402
from webapp.queue_rq.records import Records  # noqa: E402

RQ_PHASES = [("upload to Redis (web)", "store_source_s"), ("wait for a GPU worker", "rq_wait_s"),
             ("source from Redis (GPU host)", "fetch_source_s"), ("stem to Redis (GPU host)", "store_outputs_s")]


def machine() -> str:
    return f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start"


def check_stem(data: bytes, frames: int, rate: int) -> None:
    info = sf.info(io.BytesIO(data))
    assert (info.frames, info.samplerate) == (frames, rate), (info.frames, info.samplerate, frames, rate)


# ---- overhead ------------------------------------------------------------------------------------

def run_multipart(url: str, wav: bytes) -> tuple[float, str, bytes]:
    t0 = time.perf_counter()
    resp = requests.post(url + "/lego", files={"audio_file": ("a.wav", wav)},
                         data={"track_type": "drums", "bpm": "120", "format": "wav"}, timeout=300)
    wall = time.perf_counter() - t0
    resp.raise_for_status()
    return wall, resp.headers["X-Task-Id"], resp.content


def run_json(url: str, wav: bytes) -> tuple[float, str, bytes]:
    body = json.dumps({"audio_data": base64.b64encode(wav).decode(), "track_name": "vocals", "bpm": 120,
                       "audio_format": "wav"})
    t0 = time.perf_counter()
    resp = requests.post(url + "/lego", data=body, headers={"Content-Type": "application/json"}, timeout=300)
    resp.raise_for_status()
    task = resp.json()["task_id"]
    while True:
        raw = requests.get(f"{url}/lego/status/{task}", timeout=120).content
        if b'"status":"completed"' in raw or b'"status":"failed"' in raw:
            break
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    status = json.loads(raw)
    assert status["status"] == "completed", status
    return wall, task, base64.b64decode(status["audio_data"])


def overhead(repeats: int, fsync: str) -> int:
    wav = two_minute_wav()
    frames, rate = 120 * 48000, 48000
    walls: dict[tuple[str, str], list[float]] = {}
    phases: dict[str, list[float]] = {key: [] for _, key in RQ_PHASES}
    counted = 0
    with tempfile.TemporaryDirectory(prefix="acestep-rq-bench-") as tmp:
        work = Path(tmp)
        print(f"overhead: {machine()}; Redis appendfsync {fsync}", flush=True)
        one_host = Server(work, None, "one-host")  # writes the stub runner and the checkpoint folder
        stub = shlex.join([sys.executable, str(work / "stub_runner.py")])
        redis_server = RedisServer(work / "redis", fsync=fsync).start()
        (work / "rq").mkdir()
        cluster = Cluster(work / "rq", redis_server, work / "checkpoints", gpu_hosts=1, web_workers=1, runner_command=stub,
                          token_service=False, extra_env={"MAX_UPLOAD_MB": "200", "LOG_LEVEL": "WARNING"})
        try:
            cluster.start()
            records = Records(connect(redis_server.url))
            paths = {"one host (in-process queue)": one_host.url, "RQ (web + GPU worker + Redis)": cluster.web.url}
            for protocol, call in (("multipart", run_multipart), ("JSON", run_json)):
                for path, url in paths.items():
                    call(url, wav)  # warm-up: imports, page cache, the first runner
                    runs = []
                    for _ in range(repeats):
                        wall, task, stem = call(url, wav)
                        check_stem(stem, frames, rate)
                        counted += 1
                        runs.append(wall)
                        if path.startswith("RQ"):
                            timings = records.get(task).timings
                            for _, key in RQ_PHASES:
                                phases[key].append(timings.get(key, float("nan")))
                    walls[(protocol, path)] = runs
        finally:
            cluster.stop()
            redis_server.kill()
            one_host.stop()
    print(f"proof: {counted} jobs completed, each stem decoded: {frames} frames at {rate} Hz "
          f"(the 2-minute source, {len(wav) / 1e6:.1f} MB WAV, {frames * 8 / 1e6:.1f} MB decoded)")
    print(f"\nmedian of {repeats}, seconds, client's wall time")
    print("| protocol | one host | RQ | the Redis path adds |")
    print("|---|---|---|---|")
    for protocol in ("multipart", "JSON"):
        a = statistics.median(walls[(protocol, "one host (in-process queue)")])
        b = statistics.median(walls[(protocol, "RQ (web + GPU worker + Redis)")])
        print(f"| {protocol} | {a:.3f} | {b:.3f} | **{b - a:+.3f}** |")
    print("\nRQ phases (from the job records), median, seconds")
    for label, key in RQ_PHASES:
        print(f"| {label} | {statistics.median(phases[key]):.3f} |")
    return 0


# ---- throughput ---------------------------------------------------------------------------------

def throughput(worker_counts: list[int], jobs: int, seconds: float, steps: int) -> int:
    from conftest import wav_bytes  # a 220 Hz tone

    source = wav_bytes(seconds, rate=44100)
    frames = int(seconds * 44100)
    results = []
    with tempfile.TemporaryDirectory(prefix="acestep-rq-tput-") as tmp:
        work = Path(tmp)
        print(f"throughput: {machine()}", flush=True)
        tiny = work / "tiny"
        subprocess.run([sys.executable, "-m", "runner", "make-tiny-checkpoint", str(tiny)], cwd=ROOT, check=True,
                       capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        for n in worker_counts:
            base = work / f"w{n}"
            base.mkdir()
            redis_server = RedisServer(base / "redis").start()
            cluster = Cluster(base, redis_server, tiny, gpu_hosts=n, web_workers=2, token_service=False,
                              runner_command=shlex.join([sys.executable, "-m", "runner"]),
                              extra_env={"ACESTEP_DEVICE": "cpu", "LEGO_STEPS": str(steps), "LEGO_MIN_STEPS": "1",
                                         "OMP_NUM_THREADS": "1", "LOG_LEVEL": "WARNING", "WORKER_LOST_AFTER_S": "60"})
            try:
                cluster.start()
                url = cluster.web.url
                records = Records(connect(redis_server.url))
                warm = [submit(url, source, steps) for _ in range(n)]  # each worker's first job: imports and page cache
                wait_all(url, warm, frames)
                t0 = time.perf_counter()
                tasks = [submit(url, source, steps) for _ in range(jobs)]
                done_at = wait_all(url, tasks, frames)
                elapsed = max(done_at.values()) - t0
                workers = {records.get(t).worker for t in tasks}
                results.append((n, len(tasks), elapsed, len(workers)))
                print(f"proof: {n} GPU worker(s): {len(tasks)} jobs completed on {len(workers)} worker(s), each stem "
                      f"decoded ({frames} frames at 44100 Hz)", flush=True)
            finally:
                cluster.stop()
                redis_server.kill()
    print(f"\n{jobs} jobs of {seconds:g} s, {steps} steps, tiny random checkpoint on the CPU, submitted at once")
    print("| GPU workers | jobs | seconds | jobs per minute | vs 1 worker |")
    print("|---|---|---|---|---|")
    base_rate = None
    for n, count, elapsed, _ in results:
        rate = count / elapsed * 60
        base_rate = base_rate or rate
        print(f"| {n} | {count} | {elapsed:.1f} | {rate:.2f} | {rate / base_rate:.2f} x |")
    return 0


def submit(url: str, wav: bytes, steps: int) -> str:
    body = {"audio_data": base64.b64encode(wav).decode(), "track_name": "drums", "bpm": 120, "inference_steps": steps,
            "audio_format": "wav"}
    resp = requests.post(url + "/lego", json=body, timeout=60)
    resp.raise_for_status()
    return resp.json()["task_id"]


def wait_all(url: str, tasks: list[str], frames: int, timeout: float = 1800) -> dict[str, float]:
    done: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(tasks):
        assert time.monotonic() < deadline, "jobs did not finish in time"
        for task in tasks:
            if task in done:
                continue
            status = requests.get(f"{url}/lego/status/{task}", timeout=60).json()
            if status["status"] == "completed":
                done[task] = time.perf_counter()
                check_stem(base64.b64decode(status["audio_data"]), frames, 44100)
            elif status["status"] == "failed":
                raise AssertionError(status)
        time.sleep(0.2)
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--repeats", type=int, default=5)
    o.add_argument("--fsync", choices=("always", "everysec"), default="always",
                   help="Redis's appendfsync: always (docker-compose.example.yml) or everysec")
    t = sub.add_parser("throughput")
    t.add_argument("--jobs", type=int, default=6)
    t.add_argument("--workers", default="1,2")
    t.add_argument("--seconds", type=float, default=2.0)
    t.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.part == "overhead":
        return overhead(args.repeats, args.fsync)
    return throughput([int(x) for x in args.workers.split(",")], args.jobs, args.seconds, args.steps)


if __name__ == "__main__":
    sys.exit(main())
