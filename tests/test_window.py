"""A repaint window means the same on both engines: inside it the generated stem, outside it
silence with short fades, never the source (runner/window.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from conftest import run_runner, write_tone
from runner import window as repaint_window
from runner.events import EventStream
from runner.lego import EngineCache, LegoArgs, LoadedEngine, run_lego
from runner.window import FADE_S, Window, gain

RATE = 48000


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0


def outside(samples: np.ndarray, rate: int, start: float, end: float) -> np.ndarray:
    return np.concatenate([samples[: int(start * rate)], samples[int(end * rate):]])


# --- the gain curve -------------------------------------------------------------------------------

def test_gain_is_one_inside_zero_outside_with_raised_cosine_fades_inside_the_edges():
    curve = gain(Window(0.5, 1.5), 2 * RATE, RATE)
    fade = int(FADE_S * RATE)
    assert np.all(curve[: RATE // 2] == 0) and np.all(curve[int(1.5 * RATE):] == 0)
    assert np.all(curve[RATE // 2 + fade: int(1.5 * RATE) - fade] == 1)
    rise = curve[RATE // 2: RATE // 2 + fade]
    assert np.all(np.diff(rise) > 0) and 0 < rise[0] < 0.01 and 0.99 < rise[-1] < 1
    assert np.allclose(curve[int(1.5 * RATE) - fade: int(1.5 * RATE)], rise[::-1])


def test_a_window_at_the_clip_start_has_no_fade_in_and_the_whole_clip_is_untouched():
    curve = gain(Window(0.0, 1.0), 2 * RATE, RATE)
    assert curve[0] == 1 and curve[RATE - 1] < 0.01 and np.all(curve[RATE:] == 0)
    stem = np.ones((2, RATE), dtype=np.float32)
    assert repaint_window.apply(stem, Window.from_args(0.0, -1.0), RATE) is stem


def test_a_short_window_keeps_most_of_itself():
    curve = gain(Window(1.0, 1.02), 2 * RATE, RATE)
    inside = curve[RATE: int(1.02 * RATE)]
    assert inside.max() == 1 and np.count_nonzero(inside == 1) >= len(inside) // 2


# --- the diffusers engine, real subprocess ------------------------------------------------------------

def test_diffusers_engine_window_is_silence_outside_and_never_the_source(tmp_path, tiny_checkpoint):
    src = write_tone(tmp_path / "src.wav", 2.0, 44100, 2)
    out = tmp_path / "out"
    out.mkdir()
    run = run_runner("lego", "--source", src, "--track", "drums", "--bpm", "120", "--checkpoints", tiny_checkpoint,
                     "--out", out, "--steps", "2", "--seed", "3", "--repaint-start", "0.5", "--repaint-end", "1.5")
    assert run.returncode == 0, run.stderr
    (result,) = run.of("result")
    assert result["window"] == {"start_s": 0.5, "end_s": 1.5, "fade_s": FADE_S}
    stem, rate = sf.read(result["outputs"][0]["path"], always_2d=True)
    source, _ = sf.read(str(src), always_2d=True)
    assert rms(outside(stem, rate, 0.5, 1.5)) < 1e-3 * rms(outside(source, rate, 0.5, 1.5))
    assert rms(stem[int(0.55 * rate): int(1.45 * rate)]) > 0.05


# --- the acestep engine on the real fork: even an engine that returns the source ---------------------

def acestep_layout(root: Path) -> Path:
    for part, names in {"acestep-v15-base": ("config.json", "model.safetensors"), "vae": ("config.json", "model.safetensors"),
                        "Qwen3-Embedding-0.6B": ("config.json", "tokenizer.json", "model.safetensors")}.items():
        (root / part).mkdir(parents=True)
        for name in names:
            (root / part / name).write_text("{}")
    return root


def test_acestep_engine_window_never_lets_the_source_through(tmp_path):
    """ACE-Step's own repaint path splices the source back outside a window. Here the fork's real
    generate_music hands back the source itself as the "generated" stem, the worst case: the
    runner's window still leaves only silence outside it, and the source times the fades inside."""
    from acestep.handler import AceStepHandler

    from runner.engines.acestep_engine import AcestepEngine

    src = write_tone(tmp_path / "src.wav", 2.0, RATE, 2)
    source, _ = sf.read(str(src), dtype="float32", always_2d=True)
    engine = AcestepEngine()
    engine.handler, engine.device = AceStepHandler(), "cpu"
    engine.handler.model = torch.nn.Module()
    seen = {}

    def returns_the_source(**kwargs):
        seen.update(kwargs)
        return {"audios": [{"tensor": torch.from_numpy(source.T.copy()), "sample_rate": RATE}], "success": True}

    engine.handler.generate_music = returns_the_source
    engine.handler.process_src_audio = lambda path: torch.from_numpy(sf.read(path, dtype="float32")[0].T.copy())
    checkpoints = acestep_layout(tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    cache = EngineCache(LoadedEngine(engine, checkpoints, "cpu", "float32", False))
    args = LegoArgs(source=src, track="drums", bpm=120, steps=2, seed=1, repaint_start=0.5, repaint_end=1.5,
                    checkpoints=checkpoints, out=out, device="cpu", dtype="float32", offload="off", engine="acestep")
    result = run_lego(args, EventStream(out=open("/dev/null", "w"), err=open("/dev/null", "w")), cache)

    assert (seen["repainting_start"], seen["repainting_end"]) == (0.0, -1)  # ACE-Step is asked for the whole clip
    stem, rate = sf.read(result["outputs"][0]["path"], always_2d=True)
    assert np.max(np.abs(outside(stem, rate, 0.5, 1.5))) == 0
    inside = slice(int(0.5 * rate) + int(FADE_S * rate), int(1.5 * rate) - int(FADE_S * rate))
    correlation = np.corrcoef(stem[inside].ravel(), source[inside].ravel())[0, 1]
    assert correlation > 0.999  # inside the window: what the engine generated, here the source
