"""`make serve`'s next step: once /health answers, print the URL, the page and one request that
can be pasted as it is (on an example source written next to the data, since a newcomer has none).

Started in the background by scripts/serve.sh just before it becomes gunicorn (pid SERVICE_PID);
it gives up when that process ends or after a few minutes. Standard library and the settings only.
"""
from __future__ import annotations

import math
import os
import shlex
import struct
import sys
import time
import urllib.request
import wave
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from webapp.settings import Settings, SettingsError  # noqa: E402  (torch-free)

WAIT_S = 600
EXAMPLE_NAME = "example-source.wav"


def write_example(path: Path, seconds: float = 4.0, rate: int = 44100) -> Path:
    """A 4 s stereo A-minor arpeggio at 120 bpm: something to send before you have your own stem."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    notes = (220.0, 261.63, 329.63, 261.63)
    frames = bytearray()
    for i in range(int(seconds * rate)):
        t = i / rate
        beat = int(t * 2) % len(notes)
        envelope = math.exp(-3.0 * ((t * 2) % 1.0))
        sample = int(0.3 * 32767 * envelope * math.sin(2 * math.pi * notes[beat] * t))
        frames += struct.pack("<hh", sample, sample)
    partial = path.with_suffix(".partial")
    with wave.open(str(partial), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(frames))
    partial.replace(path)
    return path


def hint(port: int, example: Path, api_key: bool) -> str:
    url = f"http://localhost:{port}"
    curl = ["curl", "-o", "stem.wav", "-F", f"audio_file=@{example}", "-F", "track_type=drums", "-F", "bpm=120",
            "-F", "key_scale=Am", "-F", "format=wav"]
    if api_key:
        curl += ["-H", "X-API-Key: $API_KEY"]
    line = shlex.join(curl + [f"{url}/lego"]).replace("'X-API-Key: $API_KEY'", '"X-API-Key: $API_KEY"')
    return (f"\nacestep-stem-service is ready at {url}/\n"
            f"  the page (in a browser): {url}/\n"
            f"  try it (writes stem.wav here):\n    {line}\n")


def main(service_pid: int) -> int:
    try:
        settings = Settings.from_env()
    except SettingsError:
        return 0
    example = write_example(settings.data_dir / EXAMPLE_NAME)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            os.kill(service_pid, 0)
        except ProcessLookupError:
            return 0  # the service ended before it was ready: its own log says why
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{settings.port}/health", timeout=2) as resp:
                if resp.status == 200:
                    print(hint(settings.port, example.resolve(), bool(settings.api_key)), file=sys.stderr, flush=True)
                    return 0
        except OSError:
            pass
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
