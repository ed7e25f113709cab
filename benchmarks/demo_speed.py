"""The demo model's speed on a CPU: the real runner on the tiny random checkpoint, per phase.

Why: the demo (`make serve` without weights) exists to show the flow in seconds, and CI runs the
same checkpoint, so its time per minute of source is a figure worth keeping (docs/PERFORMANCE.md,
"The demo model on a CPU"). For each source length it runs `python -m runner lego` as a subprocess,
exactly as a person would, on synthetic 48 kHz stereo sources, pinned to `--cores` CPUs. Before it
prints a time it checks what ran: the stem's frame count equals the source's, and the DiT forward
count from the result event (`speedups.dit_forwards`) equals the steps. The phases (loading,
encoding, diffusion, decoding, writing) are the gaps between the runner's stage events, stamped as
each line arrives; it prints seconds per minute of source for each, and the runner's CPU seconds
(user + system: on a shared machine, less sensitive to other processes than the wall clock). Not
a test: nothing is asserted about the time.

    .venv/bin/python benchmarks/demo_speed.py                # 30 s and 120 s sources, 2 cores, 50 steps
    .venv/bin/python benchmarks/demo_speed.py --durations 30 --json demo.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu_bench import make_source  # noqa: E402 (a tone with a tremolo: the encoder sees a non-silent source)
from runner.contract import STAGES, EventType  # noqa: E402

PHASES = ("loading", "encoding", "generating", "decoding", "writing")  # the runner's stages, in order


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pinned(cores: int):
    """The first `cores` CPUs this process may use, for the child (and the same number of threads)."""
    allowed = sorted(os.sched_getaffinity(0))[:cores]
    return (lambda: os.sched_setaffinity(0, allowed)), len(allowed)


def run_job(ckpt: Path, source: Path, out: Path, steps: int, cores: int) -> dict:
    """One `python -m runner lego`; the stage events' arrival times give the phases."""
    preexec, threads = pinned(cores)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-m", "runner", "--json", "lego", "--source", str(source), "--track", "vocals", "--bpm", "120",
            "--checkpoints", str(ckpt), "--out", str(out), "--steps", str(steps), "--seed", "1", "--device", "cpu",
            "--dtype", "float32", "--offload", "off", "--engine", "diffusers"]
    started, cpu_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            preexec_fn=preexec)
    marks, result, progress = [], None, 0
    for line in proc.stdout:
        event = json.loads(line)
        kind = event.get("event")
        if kind == EventType.STAGE.value:
            assert event["stage"] in STAGES, event
            marks.append((event["stage"], time.perf_counter()))
        elif kind == EventType.PROGRESS.value:
            progress += 1
        elif kind in (EventType.RESULT.value, EventType.ERROR.value):
            result = event
    stderr = proc.stderr.read()
    status = proc.wait()
    ended, cpu_after = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if status != 0 or result is None or result["event"] != EventType.RESULT.value:
        raise RuntimeError(f"the runner failed (exit {status}): {result}\n{stderr[-1500:]}")
    phases = {}
    for (stage, at), (_next, until) in zip(marks, marks[1:] + [("end", ended)]):
        phases[stage] = phases.get(stage, 0.0) + until - at
    return {"wall_s": ended - started, "cpu_s": cpu_s, "phases": phases, "result": result, "progress_events": progress,
            "stages": [stage for stage, _ in marks], "threads": threads}


def check(run: dict, source: Path, steps: int) -> dict:
    """What ran: a stem as long as the source, `steps` DiT forwards with guidance's doubled batch."""
    result = run["result"]
    frames = sf.info(str(source)).frames
    outputs = result["outputs"]
    if [o["frames"] for o in outputs] != [frames]:
        raise RuntimeError(f"expected one stem of {frames} frames, got {[o['frames'] for o in outputs]}")
    dit = (result.get("speedups") or {}).get("dit_forwards") or {}
    if dit.get("calls") != steps:
        raise RuntimeError(f"expected {steps} DiT forwards, the result event reports {dit}")
    if run["stages"] != list(PHASES):
        raise RuntimeError(f"expected the stages {PHASES}, got {run['stages']}")
    return {"frames": frames, "dit_forwards": dit}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--durations", default="30,120", help="source lengths in seconds (default 30,120)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50, the service's LEGO_STEPS)")
    parser.add_argument("--cores", type=int, default=2, help="CPUs the runner is pinned to, and its threads (default 2)")
    parser.add_argument("--checkpoints", type=Path, help="a tiny checkpoint folder (default: build one in a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import diffusers
    import torch

    env = {"cpu": cpu_name(), "cpus_online": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
           "torch": torch.__version__, "diffusers": diffusers.__version__, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(env), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="demo-speed-") as work:
        work = Path(work)
        ckpt = args.checkpoints
        if ckpt is None:
            from runner.random_checkpoint import write_checkpoint

            ckpt = write_checkpoint(work / "tiny", "tiny", seed=0)
        for seconds in [int(d) for d in args.durations.split(",") if d]:
            source = make_source(work, seconds)
            run = run_job(ckpt, source, work / "out", args.steps, args.cores)
            proof = check(run, source, args.steps)
            per_minute = {phase: round(run["phases"].get(phase, 0.0) * 60 / seconds, 2) for phase in PHASES}
            row = {"source_s": seconds, "threads": run["threads"], "wall_s": round(run["wall_s"], 2), "cpu_s": round(run["cpu_s"], 1),
                   "per_minute_of_source_s": per_minute, "phases_s": {k: round(v, 2) for k, v in run["phases"].items()},
                   "runner_timings": run["result"].get("timings"), "progress_events": run["progress_events"], **proof}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{env['cpu']}, {rows[0]['threads'] if rows else args.cores} cores pinned, {args.steps} steps, {env['date']}")
    print("                                      seconds per minute of source")
    print("source_s   frames  dit_calls  wall_s   cpu_s    load  encode  diffuse  decode  write")
    for r in rows:
        m, calls = r["per_minute_of_source_s"], " ".join(f"{n}xB{b}" for b, n in r["dit_forwards"]["batch_sizes"].items())
        print(f"{r['source_s']:8} {r['frames']:8}  {calls:9} {r['wall_s']:7} {r['cpu_s']:7}  {m['loading']:6} {m['encoding']:7} "
              f"{m['generating']:8} {m['decoding']:7} {m['writing']:6}")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
