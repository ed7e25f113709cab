"""GPU benchmark: a full-size random-weight ACE-Step 1.5 base model through the real runner.

Run on a CUDA machine (see docs/PERFORMANCE.md for the exact commands). It builds the
full-size random checkpoint, then drives `python -m runner` subprocesses exactly as the
service does, sampling nvidia-smi while they run, and prints tables (also written as JSON):

  memory   per (dtype, offload, batch) and source length, a fresh runner process running the job
           twice: phase times, torch's peak allocated and reserved memory, nvidia-smi's peak (job 1
           is what the service sees), the DiT's call count and batch sizes (guidance doubles the
           batch), and nvidia-smi after the runner exits
  coldstart where a cold request's time goes; weights page-cache -> GPU copy time; a runner
           started ahead of time; keep-warm back-to-back jobs against one process per job;
           loading with device_map="cuda" against load-then-.to("cuda")
  unload   the same job in-process followed by del + gc + empty_cache: what stays held
  speed    the denoising steps through the speed-up switches: benchmarks/step_speed.py
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MIB = 1024 * 1024
DEVICE = "cuda"


def nvsmi(query: str) -> str:
    """One nvidia-smi field of GPU 0, or '' where there is no NVIDIA driver (the CPU smoke run)."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.splitlines()[0].strip()


def nvsmi_used_mib() -> int | None:
    """None where there is no GPU to read: JSON null, "n/a" in the printed table (never a made-up number)."""
    value = nvsmi("memory.used")
    return int(value) if value else None


def nvsmi_process_mib(pid: int) -> int | None:
    """GPU memory process `pid` holds, per nvidia-smi: 0 where it holds none, None without a driver."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    rows = [line.split(",") for line in out.splitlines() if "," in line]
    return sum(int(mib) for p, mib in rows if int(p) == pid)


def higher(a: int | None, b: int | None) -> int | None:
    """The higher of two readings, either of which may be missing."""
    return b if a is None else a if b is None else max(a, b)


def shown(value) -> str:
    """A reading for the printed table: "n/a" where none exists."""
    return "n/a" if value is None else str(value)


def to_mib(value: int | None) -> int | None:
    return None if value is None else value // MIB


class Sampler:
    """Polls nvidia-smi in a thread; `window()` returns the highest reading since the last call."""

    def __init__(self, period: float = 0.05):
        self.period, self.high, self._stop = period, None, threading.Event()
        self.lock, self.epoch = threading.Lock(), 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            epoch = self.epoch
            reading = nvsmi_used_mib()  # slow: a window may open meanwhile
            with self.lock:
                if epoch == self.epoch:  # a reading begun before `window()` belongs to the old window
                    self.high = higher(self.high, reading)
            time.sleep(self.period)

    def window(self) -> int | None:
        with self.lock:
            high, self.high = self.high, nvsmi_used_mib()
            self.epoch += 1
        return high

    def stop(self):
        self._stop.set()


def make_source(folder: Path, seconds: int) -> Path:
    path = folder / f"src{seconds}.wav"
    if not path.exists():
        rng = np.random.default_rng(seconds)
        t = np.arange(seconds * 48000) / 48000
        tone = 0.3 * np.sin(2 * np.pi * 196 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
        data = np.stack([tone, tone], axis=1) + 0.02 * rng.standard_normal((t.size, 2))
        sf.write(str(path), data.astype(np.float32), 48000, subtype="PCM_16")
    return path


def after_exit_mib() -> dict:
    readings = {}
    start = time.perf_counter()
    for mark in (0.02, 0.5, 2.0):
        time.sleep(max(0.0, mark - (time.perf_counter() - start)))
        readings[f"{mark}s"] = nvsmi_used_mib()
    return readings


def runner_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    return env


class Serve:
    """A keep-warm runner process: jobs on stdin, events on stdout. `wait=False` starts it ahead
    (it imports torch and diffusers, touching no GPU) and `wait_ready` waits for it later."""

    def __init__(self, idle: float = 600, wait: bool = True, env: dict | None = None, runner: list | None = None):
        """`env`: settings over the benchmark's own; `runner`: python's arguments before the
        command, `-m runner` unless given."""
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, *(runner or ["-m", "runner"]), "serve", "--idle-timeout", str(idle)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=REPO, env=dict(runner_env(), **(env or {})))
        self.stderr_lines: list[str] = []
        threading.Thread(target=lambda: self.stderr_lines.extend(self.proc.stderr), daemon=True).start()
        self.ready_s = self.import_s = None
        if wait:
            self.wait_ready()

    def wait_ready(self) -> "Serve":
        if self.ready_s is None:
            ready = self.next_event("ready")
            self.ready_s = time.perf_counter() - self.started
            self.import_s = ready.get("import_s")
        return self

    def next_event(self, *kinds):
        for line in self.proc.stdout:
            event = json.loads(line)
            if event["event"] in kinds:
                return event
        raise RuntimeError("runner ended early:\n" + "".join(self.stderr_lines[-30:]))

    def job(self, **args) -> tuple[dict, float]:
        sent = time.perf_counter()
        self.proc.stdin.write(json.dumps({"command": "lego", "args": args}) + "\n")
        self.proc.stdin.flush()
        result = self.next_event("result", "error")
        self.next_event("ready")
        return result, time.perf_counter() - sent

    def close(self) -> int:
        self.proc.stdin.write('{"command": "exit"}\n')
        self.proc.stdin.flush()
        return self.proc.wait(timeout=120)


def job_args(ckpt: Path, src: Path, out: Path, dtype: str, offload: str, batch: int, steps: int) -> dict:
    return dict(source=str(src), track="vocals", bpm=120, checkpoints=str(ckpt), out=str(out), steps=steps,
                batch_size=batch, seed=1, device=DEVICE, dtype=dtype, offload=offload, format="wav")


def part_memory(ckpt: Path, work: Path, durations: list[int], steps: int, groups: list[tuple]) -> list[dict]:
    """Each (group, length) cell in a fresh runner, as the service runs every job: job 1 is what a
    request sees (first-call warm-up included), job 2 the same job again in that process. The next
    cell's runner is started ahead, so its imports overlap this cell's jobs."""
    sampler, rows = Sampler(), []
    spare = Serve(wait=False)
    cells = [(group, seconds) for group in groups for seconds in durations]
    for index, ((dtype, offload, batch), seconds) in enumerate(cells):
        serve = spare.wait_ready()
        spare = Serve(wait=False) if index + 1 < len(cells) else None
        for job_no in (1, 2):
            sampler.window()
            result, wall = serve.job(**job_args(ckpt, make_source(work, seconds), work, dtype, offload, batch, steps))
            smi_peak = sampler.window()
            row = dict(dtype=dtype, offload=offload, batch=batch, seconds=seconds, job=job_no, wall_s=round(wall, 2), smi_peak_mib=smi_peak)
            if result["event"] == "error":
                row.update(error=result["code"], message=result["message"][:200])
            else:
                row.update(dit=(result.get("speedups") or {}).get("dit_forwards"), speedups=(result.get("speedups") or {}).get("on"),
                           timings=result["timings"], peak_reserved_mib=to_mib(result["peak_vram_bytes"]),
                           peak_allocated_mib=to_mib(result["peak_vram_allocated_bytes"]))
                for output in result["outputs"]:
                    Path(output["path"]).unlink(missing_ok=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
        status = serve.close()
        if seconds == durations[-1]:  # once per group: what the card shows after the runner exits
            rows.append(dict(dtype=dtype, offload=offload, batch=batch, exit_status=status, after_exit_mib=after_exit_mib()))
            print(json.dumps(rows[-1]), flush=True)
    sampler.stop()
    return rows


def warm_compile(ckpt: Path, work: Path, dtypes: list[str]) -> dict:
    """One short job per dtype before the table, so that its cells find the compile cache warm,
    as a deployed service does after its first job; its times are those of a cold cache."""
    out = {}
    for dtype in dtypes:
        serve = Serve()
        result, wall = serve.job(**job_args(ckpt, make_source(work, 30), work, dtype, "off", 1, 2))
        serve.close()
        out[dtype] = {"wall_s": round(wall, 2), "timings": result.get("timings"), "speedups": result.get("speedups"),
                      "error": result.get("code")}
        print(json.dumps({"warm_compile": dtype} | out[dtype]), flush=True)
    return out


def weights_copy_seconds(ckpt: Path) -> dict:
    """The floor for loading: every tensor of the lego components from page cache to the GPU."""
    import torch
    from safetensors.torch import load_file

    files = [p for part in ("transformer", "condition_encoder", "text_encoder", "vae") for p in (ckpt / part).glob("*.safetensors")]
    for f in files:  # warm the page cache
        f.read_bytes()
    torch.cuda.synchronize()
    start = time.perf_counter()
    tensors = [load_file(str(f), device="cuda") for f in files]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    size = sum(t.numel() * t.element_size() for group in tensors for t in group.values())
    del tensors
    torch.cuda.empty_cache()
    return {"seconds": round(seconds, 3), "gib": round(size / 1024**3, 2), "gib_per_s": round(size / 1024**3 / seconds, 2)}


def load_strategies(ckpt: Path, dtype: str) -> dict:
    """Load-then-.to('cuda') against device_map='cuda' (weights straight to the GPU), same process, warm cache."""
    import torch
    from diffusers import AceStepPipeline

    out = {}
    for name in ("to_cuda", "device_map_cuda", "to_cuda_again", "device_map_cuda_again"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        kwargs = dict(torch_dtype=getattr(torch, dtype), audio_tokenizer=None, audio_token_detokenizer=None)
        if name.startswith("device_map"):
            pipe = AceStepPipeline.from_pretrained(str(ckpt), device_map="cuda", **kwargs)
        else:
            pipe = AceStepPipeline.from_pretrained(str(ckpt), **kwargs).to("cuda")
        torch.cuda.synchronize()
        out[name] = round(time.perf_counter() - start, 3)
        del pipe
        gc.collect()
        torch.cuda.empty_cache()
    return out


def BF16() -> str:
    return "bfloat16" if DEVICE == "cuda" else "float32"


def label(what: str, seconds: int, dtype: str) -> str:
    """A result's key says what ran: e.g. cold_lego_120s_bfloat16_cuda, or cold_lego_2s_float32_cpu for the smoke run."""
    return f"{what}_{seconds}s_{dtype}_{DEVICE}"


def part_coldstart(ckpt: Path, work: Path, steps: int, long_s: int = 120, short_s: int = 30) -> dict:
    src30, src120 = make_source(work, short_s), make_source(work, long_s)
    report = {}
    if DEVICE == "cuda":
        report = {"weights_copy": weights_copy_seconds(ckpt), "load_strategies_bfloat16_cuda": load_strategies(ckpt, "bfloat16")}
    # A cold one-shot `lego` process, as the seed runs every job, twice (page cache warm both times).
    cold = []
    for _ in range(2):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "runner", "lego", "--source", str(src120), "--track", "vocals",
                               "--bpm", "120", "--checkpoints", str(ckpt), "--out", str(work), "--steps", str(steps),
                               "--seed", "1", "--device", DEVICE, "--dtype", BF16(), "--offload", "off"],
                              capture_output=True, text=True, cwd=REPO, env=runner_env())
        wall = time.perf_counter() - start
        result = [json.loads(l) for l in done.stdout.splitlines() if '"result"' in l]
        cold.append({"wall_s": round(wall, 2), "timings": result[0]["timings"] if result else done.stderr[-800:]})
    report[label("cold_lego", long_s, BF16())] = cold
    # A runner started ahead of time: imports done, no CUDA touched, waiting on stdin.
    serve = Serve()
    idle_mib = nvsmi_used_mib()
    result, latency = serve.job(**job_args(ckpt, src120, work, BF16(), "off", 1, steps))
    again, latency_again = serve.job(**job_args(ckpt, src120, work, BF16(), "off", 1, steps))
    serve.close()
    report[label("prestarted", long_s, BF16())] = {"ready_s": round(serve.ready_s, 2), "import_s": serve.import_s,
                                      "gpu_mib_while_waiting": idle_mib, "first_job_s": round(latency, 2),
                                      "first_timings": result.get("timings"), "warm_job_s": round(latency_again, 2),
                                      "warm_timings": again.get("timings")}
    # Back to back: three 30 s jobs, one process each against one keep-warm process.
    start = time.perf_counter()
    for _ in range(3):
        subprocess.run([sys.executable, "-m", "runner", "lego", "--source", str(src30), "--track", "drums", "--bpm", "120",
                        "--checkpoints", str(ckpt), "--out", str(work), "--steps", str(steps), "--device", DEVICE,
                        "--dtype", BF16(), "--offload", "off"], capture_output=True, cwd=REPO, env=runner_env(), check=True)
    separate = time.perf_counter() - start
    start = time.perf_counter()
    serve = Serve()
    for _ in range(3):
        serve.job(**job_args(ckpt, src30, work, BF16(), "off", 1, steps))
    serve.close()
    report[f"back_to_back_3x{short_s}s_{BF16()}_{DEVICE}"] = {"separate_processes_s": round(separate, 2), "keep_warm_s": round(time.perf_counter() - start, 2)}
    print(json.dumps(report, indent=1), flush=True)
    return report


def part_unload(ckpt: Path, work: Path, steps: int) -> dict:
    """What an in-process unload leaves: run in a child so this process keeps no CUDA context."""
    code = f"""
import gc, json, subprocess, torch, numpy as np
from diffusers import AceStepPipeline
def used(): return int(subprocess.run(['nvidia-smi','--query-gpu=memory.used','--format=csv,noheader,nounits'],capture_output=True,text=True).stdout.split()[0])
before = used()
pipe = AceStepPipeline.from_pretrained({str(ckpt)!r}, torch_dtype=torch.bfloat16, audio_tokenizer=None, audio_token_detokenizer=None).to('cuda')
src = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 30*48000)).astype('float32') * 0.1)
pipe(prompt=['x'], lyrics=[''], src_audio=src, task_type='lego', track_name='VOCALS', num_inference_steps={steps}, audio_duration=30.0)
loaded = used()
del pipe; gc.collect(); torch.cuda.empty_cache()
print(json.dumps(dict(before_mib=before, loaded_mib=loaded, after_unload_mib=used(), torch_reserved_after=torch.cuda.memory_reserved())))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=runner_env())
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    report = json.loads(lines[-1]) if lines else {"error": done.stderr[-1500:]}
    report["after_process_exit_mib"] = after_exit_mib()
    print(json.dumps(report), flush=True)
    return report


def build_checkpoint(ckpt: Path, size: str, device: str) -> float:
    """Built in a child process: this one must hold no CUDA context while runners are measured."""
    if ckpt.exists():
        return 0.0
    start = time.perf_counter()
    code = (f"import torch; from runner.random_checkpoint import write_checkpoint; "
            f"write_checkpoint({str(ckpt)!r}, {size!r}, seed=0, device={device!r}, dtype=torch.bfloat16)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=runner_env())
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/acestep-bench"))
    parser.add_argument("--parts", default="memory,coldstart,unload")
    parser.add_argument("--durations", default="30,120,240")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--groups", default="bfloat16:off:1,bfloat16:on:1,float16:off:1,float16:on:1,float32:off:1,float32:on:1,bfloat16:off:2,float16:on:2")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="tiny + --device cpu: a smoke run without a GPU")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--cold-seconds", type=int, default=120, help="source length of the cold-start runs")
    parser.add_argument("--short-seconds", type=int, default=30, help="source length of the back-to-back runs")
    parser.add_argument("--warm-compile", action="store_true", help="fill the compile cache (one short job per dtype) first")
    parser.add_argument("--speed-args", default="", help="more arguments for benchmarks/step_speed.py (the speed part)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    global DEVICE
    DEVICE = args.device
    ckpt = args.work / f"{args.size}-random"
    results = {"build_s": round(build_checkpoint(ckpt, args.size, args.device), 1)}
    import diffusers
    import torch  # imported, not initialised: nvidia-smi names the card
    import transformers

    results["env"] = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                      "gpu": nvsmi("name") or None, "driver": nvsmi("driver_version") or None,
                      "gpu_total_mib": nvsmi("memory.total") or None,
                      "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0]}
    print(json.dumps(results), flush=True)
    parts = args.parts.split(",")
    groups = [(g.split(":")[0], g.split(":")[1], int(g.split(":")[2])) for g in args.groups.split(",") if g]
    if args.warm_compile:
        results["warm_compile"] = warm_compile(ckpt, args.work, sorted({g[0] for g in groups}))
    if "memory" in parts:
        results["memory"] = part_memory(ckpt, args.work, [int(d) for d in args.durations.split(",")], args.steps, groups)
    if "unload" in parts and DEVICE == "cuda":
        results["unload"] = part_unload(ckpt, args.work, args.steps)
    if "coldstart" in parts:
        results["coldstart"] = part_coldstart(ckpt, args.work, args.steps, args.cold_seconds, args.short_seconds)
    if "speed" in parts:  # a child: this process must hold no CUDA context while runners are measured
        speed_json = args.work / "speed.json"
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_speed.py"), "--checkpoints", str(ckpt), "--work", str(args.work),
                        "--device", args.device, "--json", str(speed_json)] + args.speed_args.split(), cwd=REPO, env=runner_env())
        results["speed"] = json.loads(speed_json.read_text()) if speed_json.exists() else None
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print_memory_table(results.get("memory", []))
    return 0


def print_memory_table(rows: list[dict]) -> None:
    """The proof first (DiT calls x batch, first..last timestep), then the figures."""
    print("\ndtype     offload batch  src_s job  dit_calls       t          wall_s  load_s  enc_s  steps_s  dec_s  alloc_MiB  reserved_MiB  smi_MiB")
    for r in rows:
        if "exit_status" in r:
            print(f"{r['dtype']:9} {r['offload']:7} {r['batch']:5}  exit {r['exit_status']}, nvidia-smi after exit "
                  f"{ {mark: shown(mib) for mark, mib in r['after_exit_mib'].items()} }")
        elif "error" in r:
            print(f"{r['dtype']:9} {r['offload']:7} {r['batch']:5}  {r['seconds']:5} {r.get('job', 1):3}  {r['error']}: {r['message'][:80]}")
        else:
            t, dit = r["timings"], r.get("dit") or {}
            calls = " ".join(f"{n}xB{b}" for b, n in (dit.get("batch_sizes") or {}).items()) or "?"
            span = f"{dit.get('first_t')}..{dit.get('last_t')}"
            print(f"{r['dtype']:9} {r['offload']:7} {r['batch']:5}  {r['seconds']:5} {r.get('job', 1):3}  {calls:14}  {span:15} "
                  f"{r['wall_s']:6}  {t.get('load_s', 0):6}  {t.get('encoding_s', 0):5}  {t.get('generating_s', 0):7}  "
                  f"{t.get('decoding_s', 0):5}  {shown(r['peak_allocated_mib']):>9}  {shown(r['peak_reserved_mib']):>12}  {shown(r['smi_peak_mib']):>7}")


if __name__ == "__main__":
    sys.exit(main())
