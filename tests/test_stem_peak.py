"""A written stem peaks at -1 dBFS whatever the source's rate: the gain is set after cropping and resampling.

The model's stem runs past the source's end (the source is padded to whole latent frames, at least
5.12 s); audio there must not set the gain. Before the fix, stems of 44.1 kHz sources peaked at
-7.1 dBFS because a loud padding tail was normalised and then cut off.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from runner import audio as audio_io
from runner import sampling
from runner.lego import LegoArgs, _write

TARGET_DB = -1.0


@pytest.mark.parametrize("rate", [44100, 48000])
def test_the_peak_is_minus_1_dbfs_after_cropping_whatever_the_rate(tmp_path, rate):
    frames = int(rate * 3.7)
    source = audio_io.SourceAudio(np.zeros((frames, 2), dtype=np.float32), rate)
    model_frames = sampling.model_source(audio_io.to_model_input(source)).shape[-1]
    t = np.arange(model_frames) / 48000
    stem = np.stack([0.2 * np.sin(2 * np.pi * 300 * t)] * 2).astype(np.float32)
    stem[:, int(48000 * 3.9):] *= 5.0  # the loudest part lies past the source's end
    args = LegoArgs(source=Path("unused"), track="drums", bpm=100, out=tmp_path)
    (output,) = _write([stem], args, source, seed=1)
    written, written_rate = sf.read(output["path"], dtype="float32")
    assert written_rate == rate and written.shape == (frames, 2)
    peak_db = 20 * np.log10(np.abs(written).max())
    assert abs(peak_db - TARGET_DB) < 0.01  # 24-bit PCM rounding only
