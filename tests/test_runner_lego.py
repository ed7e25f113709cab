"""The real runner as a subprocess on the tiny checkpoint: alignment, events, determinism, batch."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from conftest import run_runner


def lego(src, out, checkpoint, *extra):
    return run_runner("lego", "--source", src, "--track", "vocals", "--bpm", "120", "--checkpoints", checkpoint,
                      "--out", out, "--steps", "3", *extra)


@pytest.mark.parametrize(
    "name,rate,channels,seconds",
    [
        ("odd.wav", 44100, 1, 7.31),  # mono, 44.1 kHz, an odd length
        ("stereo48.flac", 48000, 2, 1.3),
        ("song.mp3", 44100, 2, 1.3),
        ("low.ogg", 22050, 1, 1.1),
    ],
)
def test_stem_lines_up_with_source(tmp_path, tone, tiny_checkpoint, name, rate, channels, seconds):
    src = tone(name, seconds, rate, channels)
    source_frames = sf.read(str(src))[0].shape[0]  # what the decoder yields (MP3 included)
    out = tmp_path / "out"
    out.mkdir()
    run = lego(src, out, tiny_checkpoint, "--seed", "7")
    assert run.returncode == 0, run.stderr
    (result,) = run.of("result")
    (output,) = result["outputs"]
    data, written_rate = sf.read(output["path"])
    assert written_rate == rate == output["sample_rate"]
    assert data.shape == (source_frames, 2) == (output["frames"], 2)
    assert np.isfinite(data).all() and np.abs(data).max() > 0.1
    assert np.abs(data[-rate // 100:]).max() > 0  # the tail is generated, not zero padding
    assert sorted(p.name for p in out.iterdir()) == ["vocals-7-1.wav"]


def test_events_stages_and_progress(tmp_path, tone, tiny_checkpoint):
    run = lego(tone(), tmp_path, tiny_checkpoint, "--steps", "5")
    assert run.returncode == 0, run.stderr
    stages = [e["stage"] for e in run.of("stage")]
    assert stages == ["loading", "encoding", "generating", "decoding", "writing"]
    progress = [(e["event"], e.get("stage"), e.get("step"), e.get("total")) for e in run.events if e["event"] in ("stage", "progress")]
    # A 1 s source is one piece: its progress event comes between the encoding and generating stages.
    assert progress[1:4] == [("stage", "encoding", None, None), ("progress", "encoding", 1, 1), ("stage", "generating", None, None)]
    steps = [p for p in run.of("progress") if p["stage"] == "generating"]
    assert [p["step"] for p in steps] == [1, 2, 3, 4, 5] and {p["total"] for p in steps} == {5}
    result = run.of("result")[0]
    assert isinstance(result["seed"], int)  # a random seed is chosen and reported
    assert {"load_s", "encoding_s", "generating_s", "decoding_s", "writing_s", "total_s"} <= set(result["timings"])
    assert result["engine"] == "diffusers" and result["demo"] is True and result["dtype"] == "float32"
    assert "[runner]" in run.stderr  # progress for humans on stderr


def test_same_seed_same_audio_other_seed_differs(tmp_path, tone, tiny_checkpoint):
    src = tone()
    outs = []
    for seed, folder in ((11, "a"), (11, "b"), (12, "c")):
        (tmp_path / folder).mkdir()
        run = lego(src, tmp_path / folder, tiny_checkpoint, "--seed", str(seed))
        assert run.returncode == 0, run.stderr
        outs.append(sf.read(run.of("result")[0]["outputs"][0]["path"])[0])
    assert np.array_equal(outs[0], outs[1])
    assert not np.allclose(outs[0], outs[2])


def test_batch_of_two_writes_two_candidates(tmp_path, tone, tiny_checkpoint):
    run = lego(tone(), tmp_path, tiny_checkpoint, "--batch-size", "2", "--seed", "5", "--format", "flac")
    assert run.returncode == 0, run.stderr
    outputs = run.of("result")[0]["outputs"]
    assert [o["path"].rsplit("/", 1)[1] for o in outputs] == ["vocals-5-1.flac", "vocals-5-2.flac"]
    first, second = (sf.read(o["path"])[0] for o in outputs)
    assert first.shape == second.shape and not np.allclose(first, second)


def test_mp3_output_and_repaint_window(tmp_path, tone, tiny_checkpoint):
    src = tone(seconds=2.0)
    run = lego(src, tmp_path, tiny_checkpoint, "--format", "mp3", "--repaint-start", "0.5", "--repaint-end", "1.5")
    assert run.returncode == 0, run.stderr
    info = sf.info(run.of("result")[0]["outputs"][0]["path"])
    assert info.format == "MP3" and info.samplerate == 44100


def test_m4a_source_through_ffmpeg(tmp_path, tone, tiny_checkpoint):
    """AAC in M4A is not libsndfile's: the runner decodes it with ffmpeg, and the stem matches what it decoded."""
    import shutil
    import subprocess

    from runner.audio import read_source

    assert shutil.which("ffmpeg"), "make test installs ffmpeg"
    wav = tone("src.wav", 1.5, 44100, 2)
    m4a = tmp_path / "src.m4a"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True)
    decoded = read_source(m4a, 600)
    run = lego(m4a, tmp_path, tiny_checkpoint)
    assert run.returncode == 0, run.stderr
    output = run.of("result")[0]["outputs"][0]
    data, rate = sf.read(output["path"])
    assert rate == decoded.sample_rate == 44100 and data.shape == (decoded.frames, 2)
