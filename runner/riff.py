"""RIFF/WAVE headers, read without decoding: does the file hold all the audio its header declares?

libsndfile and ffmpeg both read a cut-off WAV quietly up to the cut, and ffprobe then reports the
shorter length as if it were the whole, so a truncated upload would yield a short stem. Standard
library only: the runner (runner/audio.py) and the web service's upload check both use it.
"""
from __future__ import annotations

import os
from pathlib import Path


def wav_bytes_missing(path: Path) -> int:
    """For a RIFF/WAVE file: how many bytes its data chunk declares beyond the end of the file."""
    with open(path, "rb") as handle:
        head = handle.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return 0
        size = os.fstat(handle.fileno()).st_size
        while True:
            chunk = handle.read(8)
            if len(chunk) < 8:
                return 0
            declared = int.from_bytes(chunk[4:8], "little")
            start = handle.tell()
            if chunk[:4] == b"data":
                # 0xFFFFFFFF marks a streamed or RF64-style header whose length is unknown
                return 0 if declared == 0xFFFFFFFF else max(0, start + declared - size)
            handle.seek(start + declared + (declared & 1))
