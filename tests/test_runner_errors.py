"""Each bad input gets its exit status and stable code, as an event, never a traceback."""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
import json

import numpy as np
import pytest
import soundfile as sf

from conftest import PYTHON, REPO, run_runner, runner_env, write_tone


def lego(src, out, checkpoint, *extra, track="drums", bpm="96"):
    return run_runner("lego", "--source", src, "--track", track, "--bpm", bpm, "--checkpoints", checkpoint,
                      "--out", out, "--steps", "2", *extra, timeout=120)


def assert_fails(run, status, code):
    assert run.returncode == status, (run.returncode, run.events, run.stderr[-2000:])
    assert run.error["code"] == code, run.error
    assert run.error["message"] and isinstance(run.error["retryable"], bool)
    assert "Traceback" not in run.stderr


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    yield folder
    assert list(folder.iterdir()) == []  # nothing is ever left behind by a failed run


def test_not_audio(tmp_path, out, tiny_checkpoint):
    fake = tmp_path / "notes.wav"
    fake.write_bytes(b"these are not the samples you are looking for\n" * 100)
    assert_fails(lego(fake, out, tiny_checkpoint), 2, "audio_unreadable")


def test_empty_file(tmp_path, out, tiny_checkpoint):
    empty = tmp_path / "empty.wav"
    empty.touch()
    assert_fails(lego(empty, out, tiny_checkpoint), 2, "audio_empty")


def test_zero_length_audio(tmp_path, out, tiny_checkpoint):
    zero = tmp_path / "zero.wav"
    sf.write(str(zero), np.zeros((0, 2), dtype=np.float32), 44100)
    assert_fails(lego(zero, out, tiny_checkpoint), 2, "audio_empty")


def test_truncated_wav(tmp_path, out, tiny_checkpoint):
    whole = write_tone(tmp_path / "whole.wav", 1.0)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert_fails(lego(cut, out, tiny_checkpoint), 2, "audio_truncated")


def test_truncated_mp3_is_refused_or_read_to_the_cut(tmp_path, out, tiny_checkpoint):
    whole = write_tone(tmp_path / "whole.mp3", 1.0)
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(whole.read_bytes()[:200])  # the first frame's header and a few bytes
    assert_fails(lego(cut, out, tiny_checkpoint), 2, "audio_unreadable")


def test_too_long(tmp_path, out, tiny_checkpoint):
    src = write_tone(tmp_path / "long.flac", 3.0)
    assert_fails(lego(src, out, tiny_checkpoint, "--max-duration", "2"), 2, "audio_too_long")
    env = runner_env(MAX_DURATION_S="2")
    run = run_runner("lego", "--source", src, "--track", "drums", "--bpm", "96", "--checkpoints", tiny_checkpoint,
                     "--out", out, env=env)
    assert_fails(run, 2, "audio_too_long")


def test_unknown_track_and_usage(tmp_path, out, tiny_checkpoint):
    src = write_tone(tmp_path / "s.wav", 1.0)
    assert_fails(lego(src, out, tiny_checkpoint, track="kazoo"), 2, "bad_arguments")
    assert_fails(run_runner("lego", "--track", "drums"), 2, "bad_arguments")


@pytest.mark.parametrize("bpm", ["29", "301", "abc"])
def test_bpm_out_of_range(tmp_path, out, tiny_checkpoint, bpm):
    src = write_tone(tmp_path / "s.wav", 1.0)
    code = "bad_arguments" if bpm == "abc" else "bad_bpm"
    assert_fails(lego(src, out, tiny_checkpoint, bpm=bpm), 2, code)


@pytest.mark.parametrize("window", [("1.5", "-1"), ("0.2", "1.4"), ("0.5", "0.5"), ("-1", "0.5")])
def test_repaint_window_outside_clip(tmp_path, out, tiny_checkpoint, window):
    src = write_tone(tmp_path / "s.wav", 1.0)
    assert_fails(lego(src, out, tiny_checkpoint, "--repaint-start", window[0], "--repaint-end", window[1]), 2, "bad_repaint_window")


def test_missing_checkpoint(tmp_path, out):
    src = write_tone(tmp_path / "s.wav", 1.0)
    assert_fails(lego(src, out, tmp_path / "nowhere"), 3, "checkpoint_missing")


def test_incomplete_checkpoint(tmp_path, out, tiny_checkpoint):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    src = write_tone(tmp_path / "s.wav", 1.0)
    run = lego(src, out, broken)
    assert_fails(run, 3, "checkpoint_incomplete")
    assert "transformer" in run.error["message"]


def test_unloadable_checkpoint(tmp_path, out, tiny_checkpoint):
    broken = tmp_path / "garbled"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    src = write_tone(tmp_path / "s.wav", 1.0)
    assert_fails(lego(src, out, broken), 3, "checkpoint_unloadable")


def test_nan_weights_give_output_nan_and_no_file(tmp_path, out, tiny_checkpoint):
    """A checkpoint whose DiT output projection is NaN: the stem is NaN, which must never become a file."""
    from safetensors.numpy import load_file, save_file

    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_checkpoint, poisoned)
    weights = poisoned / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    for name in tensors:
        if name.startswith("proj_out"):
            tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, str(weights))
    src = write_tone(tmp_path / "s.wav", 1.0)
    assert_fails(lego(src, out, poisoned), 4, "output_nan")


def test_sigterm_mid_generation_exits_5_and_writes_nothing(tmp_path, out, tiny_checkpoint):
    src = write_tone(tmp_path / "s.wav", 1.0)
    cmd = [PYTHON, "-m", "runner", "lego", "--source", str(src), "--track", "drums", "--bpm", "96",
           "--checkpoints", str(tiny_checkpoint), "--out", str(out), "--steps", "200"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=runner_env(), cwd=REPO)
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "progress" and events[-1]["stage"] == "generating" and events[-1]["step"] >= 2:
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    events += [json.loads(line) for line in proc.stdout]
    assert proc.wait(timeout=10) == 5
    assert time.monotonic() - sent < 5.0  # "at once": well under a step of a real model; generous for a busy CI
    assert events[-1]["event"] == "error" and events[-1]["code"] == "cancelled"
    assert not any(e["event"] == "result" for e in events)
