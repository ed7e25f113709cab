"""`make official-check ACESTEP_SRC=/path`: the image's engine on an official ACE-Step 1.5 checkout.

Run in the image's environment (`make image-env`), with the checkout on PYTHONPATH, this proves
what the T4 image would do with that ACE-Step, on a CPU and a tiny random checkpoint:
1. every module the runner imports for ACESTEP_ENGINE=acestep imports;
2. a tiny checkpoint in ACE-Step's own layout is built from the checkout's own model classes, and
   the runner's private view of it satisfies the checkout's own download check;
3. `python -m runner serve`, fed JSON job lines as the service does, runs two jobs end to end
   (the whole clip; a repaint window): exit status, events, real progress steps, frame counts,
   the window's meaning (outside it: silence, never the source), the patch outcomes, and that
   nothing was downloaded or written into the checkpoint folder;
4. SIGTERM during the DiT load and during diffusion ends the runner with exit 5 and no file.
It prints one summary and exits 1 if any check failed.
"""
from __future__ import annotations

import argparse
import hashlib
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from checks import acestep_tiny
from checks.serve_process import REPO, ServeRun, runner_env
from runner import sampling

RATE = 44100
SECONDS = 2.0
STEPS = 4
WINDOW = (0.5, 1.5)
DIT_LOAD_LINE = "Attempting to load model with attention implementation"
DOWNLOAD_LINES = ("auto-download", "snapshot_download", "Downloading")
VAE_ENCODE_LINE = "Encoding target audio to latents"  # ACE-Step's log line as it VAE-encodes the source


class Report:
    def __init__(self):
        self.rows: list[tuple[str, bool, str]] = []
        self.figures: list[tuple[str, str]] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append((name, bool(ok), detail))
        print(f"[official-check] {'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        return bool(ok)

    def figure(self, name: str, value: str) -> None:
        self.figures.append((name, value))

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checks.official", description=__doc__.splitlines()[0])
    parser.add_argument("--acestep-src", type=Path, required=True, help="an official ACE-Step 1.5 checkout")
    args = parser.parse_args(argv)
    src = args.acestep_src.resolve()
    report = Report()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="official-check-") as tmp:
        work = Path(tmp)
        env = runner_env(src)
        report.figure("environment", _environment())
        report.figure("ACE-Step source", _describe_source(src))
        if check_imports(report, env) and check_layout(report, src, work):
            source = _write_source(work / "source.wav")
            jobs(report, env, work, source)
            cancels(report, env, work, source)
    report.figure("whole check", f"{time.perf_counter() - started:.0f} s")
    print_summary(report)
    return 0 if report.passed else 1


def check_imports(report: Report, env: dict) -> bool:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "runner.imports", "acestep"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("[imports]")]
    tail = done.stderr.strip().splitlines()[-1:] if done.returncode else []
    report.figure("imports", f"{time.perf_counter() - t:.1f} s")
    return report.check("every module the runner imports for ACESTEP_ENGINE=acestep imports", done.returncode == 0,
                        "; ".join(lines[:1] + tail))


def check_layout(report: Report, src: Path, work: Path) -> bool:
    from acestep import model_downloader
    from runner.engines.acestep_view import build_checkpoint_view

    t = time.perf_counter()
    checkpoint = acestep_tiny.build(work / "checkpoint", src)
    report.figure("tiny checkpoint build", f"{time.perf_counter() - t:.1f} s ({_size(checkpoint) / 1e6:.1f} MB)")
    view = build_checkpoint_view(checkpoint, work / "view") / "checkpoints"
    ok = model_downloader.check_main_model_exists(view) and model_downloader.check_model_exists(acestep_tiny.DIT, view)
    plain = model_downloader.check_main_model_exists(checkpoint)
    return report.check("the runner's checkpoint view passes the checkout's own download check (no download)", ok,
                        f"check_main_model_exists: view {ok}, bare folder {plain}")


def jobs(report: Report, env: dict, work: Path, source: Path) -> None:
    checkpoint, out = work / "checkpoint", work / "out"
    out.mkdir()
    before = _hashes(checkpoint)
    common = dict(source=source, track="drums", bpm=120, steps=STEPS, seed=7, checkpoints=checkpoint, out=out, engine="acestep")
    run = ServeRun.start(env, idle_timeout=60)
    t = time.perf_counter()
    run.send("lego", **common)
    whole = run.wait_event(lambda e: e["event"] in ("result", "error"), timeout=900)
    run.wait_event(lambda e: e["event"] == "ready", timeout=30)
    first_events = list(run.events)
    run.send("lego", **{**common, "seed": 8}, repaint_start=WINDOW[0], repaint_end=WINDOW[1])
    windowed = run.wait_event(lambda e: e["event"] in ("result", "error"), timeout=900)
    run.send("exit")
    code = run.finish(timeout=120)
    report.figure("two serve jobs (one process)", f"{time.perf_counter() - t:.0f} s")
    report.check("serve: two jobs, exit 0, a result each", code == 0 and _is_result(whole) and _is_result(windowed),
                 f"exit {code}; {_short(whole)}; {_short(windowed)}")
    if not (_is_result(whole) and _is_result(windowed)):
        print("\n".join(run.stderr[-40:]), file=sys.stderr)
        return
    second_events = run.events[len(first_events):]
    for name, events, result in (("whole clip", first_events, whole), ("window", second_events, windowed)):
        _check_events(report, name, events, result)
    _check_encoding_before_generating(report, run.stderr)
    info = sf.info(str(source))
    for name, result in (("whole clip", whole), ("window", windowed)):
        output = result["outputs"][0]
        stem_info = sf.info(output["path"])
        report.check(f"{name}: stem has the source's frames, rate and channels",
                     (stem_info.frames, stem_info.samplerate, stem_info.channels) == (info.frames, info.samplerate, info.channels),
                     f"{stem_info.frames} frames at {stem_info.samplerate} Hz vs the source's {info.frames} at {info.samplerate}")
    _check_window(report, source, whole["outputs"][0]["path"], windowed["outputs"][0]["path"])
    patches = whole.get("patches", {})
    report.figure("patch outcomes", "; ".join(f"{k}: {v['status']}" for k, v in patches.items()))
    lego = patches.get("lego_source_context", {}).get("status")
    report.check("patch outcomes are in the result event and the runner's log",
                 lego in ("applied", "already fixed upstream") and any(l.startswith("[patches] ") for l in run.stderr),
                 f"lego_source_context: {lego}")
    downloads = [line for line in run.stderr if any(d in line for d in DOWNLOAD_LINES)]
    report.check("nothing downloaded", not downloads, downloads[0][:160] if downloads else "no download attempted")
    report.check("nothing written into the checkpoint folder", _hashes(checkpoint) == before,
                 f"{len(before)} files, same names and SHA-256")
    for name, result in (("whole clip", whole), ("window", windowed)):
        timings = result["timings"]
        report.figure(f"{name} timings", ", ".join(f"{k} {v}" for k, v in timings.items()))


def _check_events(report: Report, name: str, events: list, result: dict) -> None:
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    steps = [(e["step"], e["total"]) for e in events if e["event"] == "progress" and e.get("stage", "generating") == "generating"]
    wanted = ["encoding", "generating", "decoding", "writing"]
    report.check(f"{name}: stages in order", stages[-4:] == wanted and stages.count("generating") == 1, " > ".join(stages))
    report.check(f"{name}: progress is one event per real diffusion step", steps == [(k, STEPS) for k in range(1, STEPS + 1)],
                 f"{[k for k, _ in steps]} of {STEPS}")
    pieces = [(e["step"], e["total"]) for e in events if e["event"] == "progress" and e.get("stage") == "encoding"]
    # The runner's plan of ACE-Step's tiling; a 2 s source is one piece with or without a GPU.
    planned = len(sampling.source_tiles(int(SECONDS * sampling.SAMPLE_RATE), sampling.source_tile_seconds(0.0)))
    report.check(f"{name}: encoding progress is one event per piece ACE-Step's VAE encoded",
                 pieces == [(k, planned) for k in range(1, planned + 1)], f"{pieces}, {planned} planned")
    report.figure(f"{name}: encoding / generating", f"{result['timings'].get('encoding_s')} s / {result['timings'].get('generating_s')} s")


def _check_encoding_before_generating(report: Report, log: list) -> None:
    """Per job, ACE-Step's VAE encoding of the source is logged between the runner's "encoding" and
    "generating" stage lines: it is counted as encoding, never as generation time."""
    order = [line for line in log if line in ("[runner] encoding", "[runner] generating") or VAE_ENCODE_LINE in line]
    jobs = [order[i:i + 3] for i, line in enumerate(order) if line == "[runner] encoding"]
    ok = len(jobs) == 2 and all(len(j) == 3 and VAE_ENCODE_LINE in j[1] and j[2] == "[runner] generating" for j in jobs)
    report.check("the source's VAE encoding is counted as encoding, not generation time", ok,
                 f"per job: 'encoding' stage, ACE-Step's '{VAE_ENCODE_LINE}', then 'generating'")


def _check_window(report: Report, source: Path, whole_path: str, windowed_path: str) -> None:
    src, rate = sf.read(str(source), dtype="float64", always_2d=True)
    whole, _ = sf.read(whole_path, dtype="float64", always_2d=True)
    windowed, _ = sf.read(windowed_path, dtype="float64", always_2d=True)
    first, last = int(WINDOW[0] * rate), int(WINDOW[1] * rate)
    outside = np.concatenate([windowed[:first], windowed[last:]])
    src_outside = np.concatenate([src[:first], src[last:]])
    ratio = _rms(outside) / max(_rms(src_outside), 1e-12)
    report.figure("window: outside/inside RMS", f"{_rms(outside):.2e} / {_rms(windowed[first:last]):.3f} (source outside: {_rms(src_outside):.3f})")
    report.check("window: outside it, silence (energy far below the source's)", ratio < 1e-3, f"RMS ratio {ratio:.1e}")
    report.check("window: inside it, the generated stem", _rms(windowed[first:last]) > 1e-3, f"RMS {_rms(windowed[first:last]):.3f}")
    report.check("window: never the source outside it", np.max(np.abs(outside)) < 1e-3,
                 f"peak outside {np.max(np.abs(outside)):.1e}; whole-clip stem vs source correlation {_corr(whole, src):+.2f}")


def cancels(report: Report, env: dict, work: Path, source: Path) -> None:
    checkpoint = work / "checkpoint"
    for name, wait in (("during the DiT load", "load"), ("during diffusion", "diffusion")):
        out = work / f"cancel-{wait}"
        out.mkdir()
        run = ServeRun.start(env, idle_timeout=0)
        run.send("lego", source=source, track="drums", bpm=120, steps=200, seed=7, checkpoints=checkpoint, out=out,
                 engine="acestep")
        if wait == "load":
            reached = run.wait_log(DIT_LOAD_LINE, timeout=600)
        else:
            reached = run.wait_event(lambda e: e["event"] == "progress" and e["step"] >= 2, timeout=900) is not None
        sent = run.sigterm()
        code = run.finish(timeout=60)
        took = run.exited_at - sent
        last = run.events[-1] if run.events else {}
        aborted = [line for line in run.stderr if "terminate called" in line or "Aborted" in line]
        files = sorted(p.name for p in out.iterdir())
        report.check(f"SIGTERM {name}: exit 5, error 'cancelled', no file", reached and code == 5 and
                     last.get("code") == "cancelled" and not files and not aborted,
                     f"reached {reached}; exit {code} after {took:.2f} s; last event {last.get('event')}/{last.get('code')}; files {files}")


def print_summary(report: Report) -> None:
    failed = [name for name, ok, _ in report.rows if not ok]
    print("\n==================== official-check summary ====================")
    for name, value in report.figures:
        print(f"  {name}: {value}")
    print(f"  checks: {len(report.rows) - len(failed)} passed, {len(failed)} failed")
    for name in failed:
        print(f"  FAILED: {name}")
    print(f"  RESULT: {'PASS' if report.passed else 'FAIL'}")
    print("================================================================")


def _write_source(path: Path) -> Path:
    """2 s of a plucked-string-like tone with noise, 44.1 kHz stereo: a stand-in for a guitar stem."""
    t = np.arange(int(SECONDS * RATE)) / RATE
    rng = np.random.default_rng(0)
    tone = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate((196.0, 392.0, 588.0)))
    mono = 0.25 * tone * np.exp(-3 * (t % 0.5)) + 0.01 * rng.standard_normal(t.shape)
    sf.write(str(path), np.stack([mono, 0.9 * mono], axis=1).astype(np.float32), RATE)
    return path


def _environment() -> str:
    import torch
    import transformers
    import diffusers

    return (f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"diffusers {diffusers.__version__}")


def _describe_source(src: Path) -> str:
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        commit = None
    pin = re.search(r"ARG ACESTEP_COMMIT=([0-9a-f]{40})", (REPO / "Dockerfile").read_text())
    where = commit.stdout.strip() if commit is not None and commit.returncode == 0 else "not a git checkout"
    return f"{src} (HEAD: {where}); the Dockerfile pins {pin.group(1) if pin else 'nothing'}"


def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples)))) if samples.size else 0.0


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    x, y = a[:n].ravel(), b[:n].ravel()
    return float(np.corrcoef(x, y)[0, 1]) if np.std(x) > 0 and np.std(y) > 0 else 0.0


def _is_result(event: dict | None) -> bool:
    return bool(event) and event.get("event") == "result"


def _short(event: dict | None) -> str:
    if not event:
        return "no answer"
    return "result" if event["event"] == "result" else f"error {event.get('code')}: {event.get('message', '')[:200]}"


if __name__ == "__main__":
    sys.exit(main())
