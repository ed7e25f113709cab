"""Compare one lego job run through both engines (scripts/parity/run_job.py captures) and say how far apart.

Usage: python scripts/parity/compare.py LABEL TOLERANCE ACESTEP_DIR DIFFUSERS_DIR
Each DIR holds capture.npz, events.jsonl (the runner's stdout) and the written stems. TOLERANCE 0 means
identical (float32); otherwise the largest difference allowed, relative to the larger peak of the two
(reduced precision). Exit 1 when a comparison fails.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf


def result_event(folder: Path) -> dict:
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines() if line.strip()]
    results = [event for event in events if event["event"] == "result"]
    if not results:
        raise SystemExit(f"{folder}: no result event; last event {events[-1] if events else None}")
    return results[0]


def relative(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(b))), 1e-12)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) / scale


def main(label: str, tolerance: float, acestep: Path, diffusers: Path) -> int:
    ours, theirs = np.load(acestep / "capture.npz"), np.load(diffusers / "capture.npz")
    events = result_event(acestep), result_event(diffusers)
    failures = []
    if events[0]["sampling"] != events[1]["sampling"]:
        failures.append(f"sampling settings differ: {events[0]['sampling']} vs {events[1]['sampling']}")
    for name in ("source_samples", "latents", "stems"):
        a, b = ours[name], theirs[name]
        if a.shape != b.shape:
            failures.append(f"{name}: shapes {a.shape} vs {b.shape}")
            continue
        diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
        rel = relative(a, b)
        ok = diff == 0.0 if tolerance == 0 else rel <= tolerance
        print(f"[{label}] {name:14s} shape {str(a.shape):18s} max|diff| {diff:.3e}  relative {rel:.3e}  std {float(np.std(a)):.3e}  {'OK' if ok else 'FAIL'}")
        if not ok:
            failures.append(f"{name}: max|diff| {diff:.3e}, relative {rel:.3e} > {tolerance}")
    if ours["stems"].shape[0] > 1 and np.array_equal(ours["stems"][0], ours["stems"][1]):
        failures.append("the two candidates are identical: their noise seeds had no effect")
    for a_out, b_out in zip(events[0]["outputs"], events[1]["outputs"]):
        a_path, b_path = Path(a_out["path"]), Path(b_out["path"])
        a_audio, _ = sf.read(a_path, dtype="float32")
        b_audio, rate = sf.read(b_path, dtype="float32")
        same = hashlib.sha256(a_path.read_bytes()).hexdigest() == hashlib.sha256(b_path.read_bytes()).hexdigest()
        peak = 20 * np.log10(max(float(np.max(np.abs(b_audio))), 1e-12))
        print(f"[{label}] file {b_path.name}: {rate} Hz, {len(b_audio)} frames, peak {peak:.2f} dBFS, "
              f"{'byte-identical' if same else f'max|diff| {float(np.max(np.abs(a_audio - b_audio))):.3e}'}")
        if tolerance == 0 and not same:
            failures.append(f"{b_path.name} differs between the engines")
    print(f"[{label}] sampling (both engines' result events): {json.dumps(events[1]['sampling'])}")
    speedups = (events[1].get("speedups") or {})
    print(f"[{label}] diffusers engine speed-ups on: {speedups.get('on')}; DiT forwards: {speedups.get('dit_forwards')}")
    for failure in failures:
        print(f"[{label}] FAIL {failure}")
    print(f"[{label}] {'PASS' if not failures else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    label, tolerance, acestep, diffusers = sys.argv[1:5]
    sys.exit(main(label, float(tolerance), Path(acestep), Path(diffusers)))
