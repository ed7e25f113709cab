"""`GET /` for browsers and for API clients, the page's files, and `POST /analyze` (its answers, its
refusals and what it leaves on disk), on the Flask app with the fake runner."""
from __future__ import annotations

import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from conftest import ROOT, files_under, wav_bytes
from music_synth import drum_pattern, triads
from music_synth import wav_bytes as synth_wav
from webapp import routes_analyze

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
STATIC = ROOT / "webapp" / "static"


@pytest.fixture
def app(make_app):
    return make_app(MAX_UPLOAD_MB="2", MAX_DURATION_S="20")


def analyze(client, audio: bytes | None, filename: str = "source.wav", **headers):
    data = {} if audio is None else {"audio_file": (io.BytesIO(audio), filename)}
    return client.post("/analyze", data=data, content_type="multipart/form-data", headers=headers)


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        self.refs += [value for name, value in attrs if name in ("src", "href") and value]


# ---- GET / ---------------------------------------------------------------------------------------

def test_a_browser_gets_the_page_and_api_clients_the_endpoint_list(client):
    page = client.get("/", headers={"Accept": BROWSER_ACCEPT})
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "default-src 'self'" in page.headers["Content-Security-Policy"] and page.headers["Vary"] == "Accept"
    assert b"<title>ACE-Step stem service</title>" in page.data
    for accept in ("*/*", "application/json", None):
        resp = client.get("/", headers={"Accept": accept} if accept else {})
        assert resp.mimetype == "application/json", accept
        assert "POST /lego" in resp.get_json()["endpoints"] and "POST /analyze" in resp.get_json()["endpoints"]


def test_the_page_loads_nothing_from_elsewhere(client):
    page = client.get("/", headers={"Accept": BROWSER_ACCEPT})
    parser = _Refs()
    parser.feed(page.data.decode())
    assert parser.refs and all(ref.startswith("/static/") for ref in parser.refs), parser.refs
    for ref in parser.refs:
        assert client.get(ref).status_code == 200, ref
    for path in STATIC.rglob("*"):
        if path.is_file():
            text = path.read_text()
            urls = [u for u in re.findall(r"https?://[^\s\"')]+", text) if u != "http://www.w3.org/2000/svg"]
            assert urls == [], (path, urls)
    for module in (STATIC / "js").glob("*.js"):
        for imported in re.findall(r"from \"([^\"]+)\"", module.read_text()):
            assert imported.startswith("./") and (module.parent / imported).is_file(), (module, imported)
            assert client.get("/static/js/" + imported[2:]).mimetype == "text/javascript"


def test_the_json_index_carries_what_the_page_needs(client):
    from runner.tracks import DEFAULT_CAPTIONS as RUNNER_CAPTIONS  # the test may import both sides

    body = client.get("/").get_json()
    assert body["track_captions"] == RUNNER_CAPTIONS and body["track_types"] == list(RUNNER_CAPTIONS)
    assert body["limits"]["max_upload_mb"] == 2 and body["limits"]["max_duration_s"] == 20
    assert body["limits"]["steps"] == {"default": 8, "min": 2, "max": 50} and body["output_formats"] == ["mp3", "wav", "flac"]


def test_with_an_api_key_the_page_is_open_and_analyze_is_not(make_app):
    client = make_app(API_KEY="s3cret").test_client()
    assert client.get("/", headers={"Accept": BROWSER_ACCEPT}).status_code == 200
    assert client.get("/static/js/app.js").status_code == 200 and client.get("/static/page.css").status_code == 200
    resp = analyze(client, wav_bytes(2.0))
    assert resp.status_code == 401 and resp.get_json()["error_code"] == "unauthorized"
    assert analyze(client, wav_bytes(2.0), **{"X-API-Key": "s3cret"}).status_code == 200


# ---- POST /analyze -----------------------------------------------------------------------------

def test_analyze_finds_tempo_and_key_and_leaves_nothing(client, data_dir):
    music = 0.6 * drum_pattern(100, 8.0) + 0.8 * np.tile(triads(2, False, seconds_per_chord=0.6, repeats=1), 4)[: 8 * 44100]
    resp = analyze(client, synth_wav(music.astype(np.float32)))
    body = resp.get_json()
    assert resp.status_code == 200, body
    assert body["success"] is True and body["bpm"] == 100 and body["key_scale"] == "D major"
    assert body["duration"] == pytest.approx(8.0) and body["sample_rate"] == 44100 and body["channels"] == 2
    assert 0 < body["bpm_confidence"] <= 1 and 0 < body["key_confidence"] <= 1
    assert set(body) >= {"bpm", "bpm_confidence", "key_scale", "key_confidence", "duration", "bpm_ambiguous", "bpm_alternative"}
    assert files_under(data_dir / "jobs") == files_under(data_dir / "tmp") == []


def test_analyze_takes_compressed_formats(client, data_dir, tmp_path, which_ffmpeg):
    import subprocess

    wav = tmp_path / "s.wav"
    wav.write_bytes(synth_wav(drum_pattern(90, 6.0)))
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-b:a", "128k", str(tmp_path / "s.mp3")], check=True)
    body = analyze(client, (tmp_path / "s.mp3").read_bytes(), "s.mp3").get_json()
    assert body["bpm"] in (90, 180) and body["source_format"] == "mp3" and body["duration"] == pytest.approx(6.0, abs=0.06)


def test_silence_is_answered_not_refused(client):
    body = analyze(client, synth_wav(np.zeros(3 * 44100, dtype=np.float32))).get_json()
    assert body["success"] is True and body["bpm"] is None and body["key_scale"] is None and body["duration"] == 3.0


@pytest.mark.parametrize("name,audio,code,status", [
    ("no file", None, "missing_audio", 400),
    ("not audio", b"plainly text, not audio\n" * 300, "not_audio", 400),
    ("empty", b"", "empty_audio", 400),
    ("too long", wav_bytes(21, rate=8000, channels=1), "audio_too_long", 400),
    ("too short", wav_bytes(0.2), "audio_too_short", 400),
    ("over the upload limit", b"\0" * (2 * 1024 * 1024 + 10), "upload_too_large", 413),
])
def test_analyze_refuses_what_lego_refuses(client, data_dir, name, audio, code, status):
    resp = analyze(client, audio, filename="../../evil.wav")
    body = resp.get_json()
    assert resp.status_code == status and body["error_code"] == code and body["retryable"] is False, body
    assert files_under(data_dir / "jobs") == files_under(data_dir / "tmp") == []


def test_analyze_wants_multipart(client, data_dir):
    resp = client.post("/analyze", json={"audio_data": "AAAA"})
    assert resp.status_code == 415 and resp.get_json()["error_code"] == "unsupported_content_type"


def test_one_analysis_at_a_time_then_analysis_busy(app, client, data_dir, monkeypatch):
    monkeypatch.setattr(routes_analyze, "ANALYSIS_WAIT_S", 0.2)
    slots = app.extensions["acestep.analysis_slots"]
    assert slots.acquire(timeout=1)  # an analysis in progress
    try:
        resp = analyze(client, wav_bytes(2.0))
    finally:
        slots.release()
    body = resp.get_json()
    assert resp.status_code == 429 and body["error_code"] == "analysis_busy" and body["retryable"] is True
    assert resp.headers["Retry-After"] == str(routes_analyze.RETRY_AFTER_S)
    assert files_under(data_dir / "jobs") == files_under(data_dir / "tmp") == []
    assert analyze(client, wav_bytes(2.0)).status_code == 200  # the slot came back


def test_lego_still_requires_bpm(client):
    resp = client.post("/lego", data={"track_type": "drums", "audio_file": (io.BytesIO(wav_bytes(2.0)), "a.wav")},
                       content_type="multipart/form-data")
    assert resp.status_code == 400 and resp.get_json()["error_code"] == "missing_bpm"
