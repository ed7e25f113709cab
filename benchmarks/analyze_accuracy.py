"""Accuracy of `webapp.analysis` (POST /analyze) on synthesized material with known answers.

    .venv/bin/python benchmarks/analyze_accuracy.py            # print the tables
    .venv/bin/python benchmarks/analyze_accuracy.py --write    # also rewrite docs/ANALYZE.md's tables

Tempo: click tracks and rock drum patterns at 70..180 BPM (every 5 BPM, plus a few odd tempos),
clean and with white noise at 10 dB and 0 dB SNR. A case is "exact" when the answered bpm
is within 1 BPM of the truth, "octave, flagged" when it is half or double the truth (within 1 BPM)
and the answer flags that ambiguity with the truth as its alternative, else "wrong".
Key: I-IV-V-I triads and scales (up and down from the tonic) in all 12 major and 12 minor keys,
clean and with noise; right or wrong, and the wrong ones by kind (relative, parallel, fifth, other).

The material comes from tests/music_synth.py; tests/test_analysis_accuracy.py asserts the same
cases: tempo exact or flagged everywhere, key right on all clean material.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import music_synth as synth  # noqa: E402
from webapp.analysis import MAJOR_NAMES, MINOR_NAMES, analyze  # noqa: E402

TEMPI = tuple(range(70, 181, 5)) + (73, 97, 133, 167, 177)
NOISE_DB = (None, 10.0, 0.0)  # None: clean
TEMPO_SECONDS = 20.0
DOC = ROOT / "docs" / "ANALYZE.md"
BEGIN, END = "<!-- analyze_accuracy.py: begin -->", "<!-- analyze_accuracy.py: end -->"


@dataclass
class Case:
    kind: str  # "click" | "drums" | "triads" | "scale"
    noise_db: float | None
    bpm: float | None = None
    tonic: int | None = None
    minor: bool = False

    @property
    def noise(self) -> str:
        return "clean" if self.noise_db is None else f"noise {self.noise_db:g} dB SNR"

    def audio(self):
        if self.kind == "click":
            signal = synth.click_track(self.bpm, TEMPO_SECONDS)
        elif self.kind == "drums":
            signal = synth.drum_pattern(self.bpm, TEMPO_SECONDS)
        elif self.kind == "triads":
            signal = synth.triads(self.tonic, self.minor)
        else:
            signal = synth.scale(self.tonic, self.minor)
        return signal if self.noise_db is None else synth.with_noise(signal, self.noise_db)


def tempo_cases() -> list[Case]:
    return [Case(kind, noise, bpm=bpm) for kind in ("click", "drums") for noise in NOISE_DB for bpm in TEMPI]


def key_cases() -> list[Case]:
    return [Case(kind, noise, tonic=tonic, minor=minor) for kind in ("triads", "scale") for noise in NOISE_DB
            for minor in (False, True) for tonic in range(12)]


def judge_tempo(case: Case, result) -> str:
    if result.bpm is not None and abs(result.bpm_precise - case.bpm) <= 1.0:
        return "exact"
    octave = result.bpm is not None and min(abs(result.bpm_precise * f - case.bpm) for f in (0.5, 2.0)) <= 1.0
    if octave and result.bpm_ambiguous and abs(result.bpm_alternative - case.bpm) <= 1.0:
        return "octave, flagged"
    return "wrong"


def parse_key(name: str | None) -> tuple[int, bool] | None:
    match = re.match(r"^([A-G][#b]?) (major|minor)$", name or "")
    if not match:
        return None
    minor = match.group(2) == "minor"
    return (MINOR_NAMES if minor else MAJOR_NAMES).index(match.group(1)), minor


def judge_key(case: Case, result) -> str:
    got = parse_key(result.key_scale)
    if got is None:
        return "none"
    tonic, minor = got
    if (tonic, minor) == (case.tonic, case.minor):
        return "right"
    if minor != case.minor and tonic == case.tonic:
        return "parallel"
    if minor != case.minor and tonic == (case.tonic + (9 if not case.minor else 3)) % 12:
        return "relative"
    if minor == case.minor and tonic in ((case.tonic + 7) % 12, (case.tonic + 5) % 12):
        return "fifth"
    return "other"


def run(cases: list[Case], judge) -> list[tuple[Case, object, str, float]]:
    out = []
    for case in cases:
        audio = case.audio()
        t0 = time.perf_counter()
        result = analyze(audio, synth.RATE)
        out.append((case, result, judge(case, result), time.perf_counter() - t0))
    return out


def tempo_table(rows) -> str:
    groups: dict[tuple, Counter] = defaultdict(Counter)
    for case, _, verdict, _ in rows:
        groups[(case.kind, case.noise)][verdict] += 1
    lines = ["| material | noise | cases | within 1 BPM | half/double, flagged | wrong |", "|---|---|---|---|---|---|"]
    for (kind, noise), count in groups.items():
        total = sum(count.values())
        lines.append(f"| {kind} | {noise} | {total} | {count['exact']} | {count['octave, flagged']} | {count['wrong']} |")
    return "\n".join(lines)


def key_table(rows) -> str:
    groups: dict[tuple, Counter] = defaultdict(Counter)
    for case, _, verdict, _ in rows:
        groups[(case.kind, "minor" if case.minor else "major", case.noise)][verdict] += 1
    lines = ["| material | mode | noise | cases | right | relative | parallel | fifth | other / none |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (kind, mode, noise), count in groups.items():
        total = sum(count.values())
        lines.append(f"| {kind} | {mode} | {noise} | {total} | {count['right']} | {count['relative']} | "
                     f"{count['parallel']} | {count['fifth']} | {count['other'] + count['none']} |")
    return "\n".join(lines)


def octave_figures(rows) -> str:
    """How often the answer is half/double and how often a right answer still carries a flag."""
    exact = [r for _, r, v, _ in rows if v == "exact"]
    flagged_exact = sum(1 for r in exact if r.bpm_ambiguous)
    errors = [abs(r.bpm_precise - c.bpm) for c, r, v, _ in rows if v == "exact"]
    return (f"Of the {len(exact)} answers within 1 BPM, {flagged_exact} also name a half/double alternative; "
            f"their largest error is {max(errors):.2f} BPM and the mean {sum(errors) / len(errors):.2f} BPM.")


def report() -> str:
    import librosa
    import numpy

    t0 = time.perf_counter()
    tempo_rows = run(tempo_cases(), judge_tempo)
    key_rows = run(key_cases(), judge_key)
    took = time.perf_counter() - t0
    per_case = [dt for *_, dt in tempo_rows + key_rows]
    return "\n\n".join([
        f"Tempo: {len(tempo_rows)} clips of {TEMPO_SECONDS:g} s (click tracks and drum patterns at {len(TEMPI)} tempos "
        f"from {min(TEMPI)} to {max(TEMPI)} BPM).",
        tempo_table(tempo_rows),
        octave_figures(tempo_rows),
        f"Key: {len(key_rows)} clips (triads 12 s, scales 14 s; 24 keys).",
        key_table(key_rows),
        f"Analysis time per clip: median {sorted(per_case)[len(per_case) // 2] * 1000:.0f} ms, "
        f"longest {max(per_case) * 1000:.0f} ms (the first includes librosa's numba compilation); "
        f"{len(per_case)} clips in {took:.1f} s (librosa {librosa.__version__}, numpy {numpy.__version__}; "
        f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}).",
    ])


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    DOC.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite the tables in {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    text = report()
    print(text)
    if args.write:
        write_doc(text)
        print(f"\nwrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
