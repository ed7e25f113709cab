"""What a fresh process pays for the compiled path, the runner being a fresh process per job.

`first_forward` is one new process's cost before its first DiT forward (load, switches, first
call; with the compile switch that is Dynamo's trace plus Inductor's cache load). `cold_runner`
is a whole one-shot `python -m runner lego` process, and `prestarted_runner` the service's own cold
request (a runner started ahead, then its first job), each under several ACESTEP_SPEEDUPS settings,
alternated. `cold_runner` is called from step_speed.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks.step_speed import REPO, VARIANTS


def first_forward(ckpt: Path, dtype_name: str, device: str, names: tuple, t4: bool) -> dict:
    """What a fresh process pays before its first forward: transformer load, switches, first call."""
    import torch

    from benchmarks.step_speed import capture_kwargs, forward, fresh_transformer, load_pipe, make_source, sync, t4_attention
    from runner import speedups

    dtype = getattr(torch, dtype_name)
    ctx = t4_attention() if t4 else contextlib.nullcontext()
    with ctx:
        t0 = time.perf_counter()
        pipe = load_pipe(ckpt, dtype, device)
        kwargs = capture_kwargs(pipe, make_source(8), device)  # eager, so the compiled call below is the first
        tr = fresh_transformer(ckpt, dtype, device)
        loaded = time.perf_counter()
        speedups.apply(SimpleNamespace(transformer=tr), device, names, flash=not t4)
        forward(tr, kwargs)
        sync(device)
        first = time.perf_counter()
        forward(tr, kwargs)
        sync(device)
        second = time.perf_counter()
    from torch._dynamo.utils import compile_times, counters

    phases = compile_times(repr="csv", aggregate=True)  # (names, seconds) of Dynamo/Inductor's phases
    return {"phases_s": {n: round(float(t), 3) for n, t in zip(*phases) if float(t) >= 0.05},
            "compile_threads": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"),"names": list(names), "load_s": round(loaded - t0, 2), "first_call_s": round(first - loaded, 3),
            "second_call_s": round(second - first, 3),
            "cache": {k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd", "dynamo_cache")}}


def fresh_processes(ckpt: Path, args, emit) -> None:
    """A new process's first compiled forward with the cache warm (filled above), against eager."""
    for dtype_name in args.dtypes:
        t4 = dtype_name == "float16" and args.device == "cuda"
        for name, threads in (("eager", None), (args.fresh_variant, None), (args.fresh_variant, "1")):
            code = (f"import json,sys; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path; "
                    f"from benchmarks.cold_compile import first_forward; "
                    f"print('FRESH', json.dumps(first_forward(Path({str(ckpt)!r}), {dtype_name!r}, {args.device!r}, "
                    f"{VARIANTS[name]!r}, {t4!r})))")
            env = dict(os.environ, **({"TORCHINDUCTOR_COMPILE_THREADS": threads} if threads else {}))
            if name == "eager" and threads:
                continue
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
            lines = [l[6:] for l in done.stdout.splitlines() if l.startswith("FRESH ")]
            emit(f"fresh_{dtype_name}_{name}{'_threads' + threads if threads else ''}", json.loads(lines[-1]) if lines else {"error": done.stderr[-2000:]})


def patched_runner(patch: str) -> str:
    """`python -c` code for the runner's own entry point with `patch` run first (after huge pages
    are asked for, as `main` does before torch is imported): a side-by-side without one piece."""
    return ("import sys; from runner import host_memory; host_memory.ask_for_huge_pages(); "
            f"{patch}; from runner.cli import main; sys.exit(main())")


# `speedups.prefetch` answering None (the engine looks it up at load): the compiled blocks load at
# the first block call, as before the prefetch.
NO_PREFETCH_RUNNER = patched_runner("import runner.speedups as s; s.prefetch = lambda *a, **k: None")
# The compiled blocks' loader left to the first job, as before it was imported ahead.
NO_IMPORT_AHEAD_RUNNER = patched_runner("import runner.engines as e; e.COMPILE_LOADER_MODULES = ()")


def cold_runner(ckpt: Path, args, emit) -> None:
    """A one-shot `python -m runner lego` (a fresh process per job, the seed's behaviour) per setting.
    A setting `SWITCHES/noprefetch` runs the same runner with the compiled blocks' prefetch thread
    left out (they then load at the first block call, as before the prefetch), for a side-by-side."""
    from benchmarks.gpu_bench import make_source as wav_source

    work = Path(args.work)
    src = wav_source(work, int(args.seconds))
    for attempt in range(args.cold_runs):
        for entry in args.cold_settings.split(";"):
            setting, _, mode = entry.partition("/")
            env = dict(os.environ, ACESTEP_SPEEDUPS=setting, HF_HUB_OFFLINE="1",
                       PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            runner = (["-c", NO_PREFETCH_RUNNER] if mode == "noprefetch" else ["-m", "runner"])
            t = time.perf_counter()
            done = subprocess.run([sys.executable, *runner, "lego", "--source", str(src), "--track", "vocals", "--bpm", "120",
                                   "--checkpoints", str(ckpt), "--out", str(work), "--seed", "1", "--device", args.device,
                                   "--dtype", args.dtypes[0], "--offload", "off"], capture_output=True, text=True, cwd=REPO, env=env)
            wall = time.perf_counter() - t
            result = [json.loads(l) for l in done.stdout.splitlines() if l.startswith('{"event":"result"')]
            row = {"wall_s": round(wall, 2)}
            if result:
                row.update(timings=result[0]["timings"], speedups=result[0].get("speedups"),
                           peak_vram_mib=(result[0].get("peak_vram_bytes") or 0) // 2**20)
                for output in result[0]["outputs"]:
                    Path(output["path"]).unlink(missing_ok=True)
            else:
                row["error"] = (done.stdout[-500:] + done.stderr[-1500:])
            emit(f"cold_runner_{entry.replace(',', '+').replace('/', '_')}_{attempt + 1}", row)


def prestarted_runner(ckpt: Path, args, emit) -> None:
    """The service's cold request: a `serve` runner started ahead (imports done while it waits, no
    GPU touched) and its first job, timed from the job line to the result, as `JobRunner` runs it.
    Entries of `args.cold_settings` as in `cold_runner`; `SWITCHES/noimport` leaves the compiled
    blocks' loader to the job (runner.engines.COMPILE_LOADER_MODULES emptied) for a side-by-side."""
    from benchmarks.gpu_bench import Serve, nvsmi_process_mib
    from benchmarks.gpu_bench import make_source as wav_source

    work = Path(args.work)
    src = wav_source(work, int(args.seconds))
    job = dict(source=str(src), track="vocals", bpm=120, checkpoints=str(ckpt), out=str(work), seed=1,
               device=args.device, dtype=args.dtypes[0], offload="off", format="wav")
    for attempt in range(args.cold_runs):
        for entry in args.cold_settings.split(";"):
            setting, _, mode = entry.partition("/")
            serve = Serve(env={"ACESTEP_SPEEDUPS": setting, "ACESTEP_ENGINE": "diffusers"},
                          runner=["-c", NO_IMPORT_AHEAD_RUNNER] if mode == "noimport" else None)
            idle_mib = nvsmi_process_mib(serve.proc.pid) if args.device == "cuda" else None
            result, seconds = serve.job(**job)
            serve.close()
            row = {"ready_s": round(serve.ready_s, 2), "import_s": serve.import_s, "gpu_mib_while_waiting": idle_mib,
                   "job_s": round(seconds, 2)}
            if result.get("event") == "result":
                row.update(timings=result["timings"], speedups=result.get("speedups"),
                           peak_vram_mib=(result.get("peak_vram_bytes") or 0) // 2**20)
                for output in result["outputs"]:
                    Path(output["path"]).unlink(missing_ok=True)
            else:
                row["error"] = result
            emit(f"prestarted_{entry.replace(',', '+').replace('/', '_')}_{attempt + 1}", row)


def artifact_load_profile(cache: Path, top: int = 25) -> dict:
    """Where a fresh process's load of the saved compiled blocks goes (run in a new process, after
    torch and diffusers are imported): each artifact loaded in turn under cProfile, in this thread."""
    import cProfile
    import pstats

    import diffusers  # noqa: F401 - imported before the clock starts, as the runner has it
    import torch  # noqa: F401

    from runner.compiled_blocks import load_artifact

    paths = sorted(cache.glob("dit-*.block"))
    profile = cProfile.Profile()
    t = time.perf_counter()
    profile.enable()
    loaded = [load_artifact(p) is not None for p in paths]
    profile.disable()
    seconds = time.perf_counter() - t
    stats = pstats.Stats(profile)
    rows = sorted(((f"{Path(k[0]).name}:{k[1]}({k[2]})", v[3]) for k, v in stats.stats.items()), key=lambda r: -r[1])
    return {"artifacts": [p.name for p in paths], "loaded": loaded, "seconds": round(seconds, 2),
            "top_cumulative_s": [(name, round(s, 3)) for name, s in rows[:top]]}


def loader_imports(cache: Path, ahead: bool) -> dict:
    """Run in a fresh process with the diffusers engine imported: where loading the saved compiled
    blocks goes with (`ahead`) or without runner.engines.COMPILE_LOADER_MODULES imported first. The
    seconds of each part, and the modules the load still imported (apart from Inductor's generated code)."""
    import importlib

    import runner.engines.diffusers_engine  # noqa: F401 - the engine's stack, as a runner has it
    from runner.compiled_blocks import load_artifact
    from runner.engines import COMPILE_LOADER_MODULES

    t = time.perf_counter()
    for module in COMPILE_LOADER_MODULES if ahead else ():
        importlib.import_module(module)
    ahead_s = time.perf_counter() - t
    before = set(sys.modules)
    t = time.perf_counter()
    loaded = [load_artifact(p) is not None for p in sorted(cache.glob("dit-*.block"))]
    load_s = time.perf_counter() - t
    new = sorted(m for m in set(sys.modules) - before if ".compile_tasks." not in m and not m.endswith(".kernel"))
    return {"ahead_s": round(ahead_s, 2), "load_s": round(load_s, 2), "loaded": loaded, "modules_imported": len(new),
            "modules": new if len(new) <= 40 else new[:40] + ["..."]}

