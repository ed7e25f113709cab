"""Every bad input of issue 3's list: a clear 4xx in the one error shape, and nothing left on disk."""
from __future__ import annotations

import base64
import io
import json

import pytest

from conftest import files_under, lame_mp3_bytes, mp3_bytes, wav_bytes


@pytest.fixture
def app(make_app):
    return make_app(MAX_UPLOAD_MB="1", MAX_DURATION_S="20")


def form(audio: bytes | None = None, filename: str = "source.wav", **fields) -> dict:
    data = {"track_type": "drums", "bpm": "120", **fields}
    if audio is not None:
        data["audio_file"] = (io.BytesIO(audio), filename)
    return data


def vst_json(audio: bytes | str | None = None, **fields) -> dict:
    if isinstance(audio, bytes):
        audio = base64.b64encode(audio).decode()
    body = {"track_name": "vocals", "bpm": 120, "inference_steps": 8, "caption": "", "lyrics": "", "guidance_scale": 7.0,
            "seed": -1, "batch_size": 1, "audio_format": "wav", **fields}
    if audio is not None:
        body["audio_data"] = audio
    return body


def assert_refused(resp, status: int, code: str, data_dir):
    body = resp.get_json()
    assert resp.status_code == status, (resp.status_code, body)
    assert body["success"] is False and body["error_code"] == code, body
    assert isinstance(body["error"], str) and len(body["error"]) > 20 and body["retryable"] is False
    assert files_under(data_dir / "jobs") == files_under(data_dir / "tmp") == [], "a refused upload left files behind"
    assert [p.name for p in (data_dir / "jobs").iterdir()] == [], "a refused upload left a job folder"


@pytest.mark.parametrize("name,data,code", [
    ("no file", form(None), "missing_audio"),
    ("not audio named .wav", form(b"this is plainly not audio, just text\n" * 200), "not_audio"),
    ("empty file", form(b""), "empty_audio"),
    ("unknown track_type", form(wav_bytes(2), track_type="kazoo"), "invalid_track_type"),
    ("missing bpm", {k: v for k, v in form(wav_bytes(2)).items() if k != "bpm"}, "missing_bpm"),
    ("non-integer bpm", form(wav_bytes(2), bpm="fast"), "invalid_bpm"),
    ("bpm rounding below its range", form(wav_bytes(2), bpm="29.4"), "invalid_bpm"),
    ("bpm not finite", form(wav_bytes(2), bpm="nan"), "invalid_bpm"),
    ("bpm too low", form(wav_bytes(2), bpm="10"), "invalid_bpm"),
    ("bpm too high", form(wav_bytes(2), bpm="1000"), "invalid_bpm"),
    ("batch_size 3", form(wav_bytes(2), batch_size="3"), "invalid_batch_size"),
    ("5,000-character caption", form(wav_bytes(2), caption="x" * 5000), "caption_too_long"),
    ("bad key_scale", form(wav_bytes(2), key_scale="H dorian"), "invalid_key_scale"),
    ("bad output format", form(wav_bytes(2), format="ogg"), "invalid_audio_format"),
    ("audio_duration not a number", form(wav_bytes(2), audio_duration="long"), "invalid_parameter"),
    ("audio_duration disagrees", form(wav_bytes(2), audio_duration="9.5"), "audio_duration_mismatch"),
    ("too long", form(wav_bytes(21, rate=8000, channels=1)), "audio_too_long"),
    ("too short", form(wav_bytes(0.2)), "audio_too_short"),
    ("repaint window outside", form(wav_bytes(2), repaint_start="5"), "invalid_parameter"),
])
def test_multipart_bad_input(client, data_dir, name, data, code):
    resp = client.post("/lego", data=data, content_type="multipart/form-data")
    assert_refused(resp, 400, code, data_dir)


def test_truncated_mp3(client, data_dir, tmp_path, which_ffmpeg):
    whole = lame_mp3_bytes(tmp_path, 6.0)
    for cut, code in ((whole[: len(whole) // 3], "truncated_audio"), (whole[:600], "not_audio")):
        resp = client.post("/lego", data=form(cut, "song.mp3"), content_type="multipart/form-data")
        assert_refused(resp, 400, code, data_dir)


def test_upload_over_the_limit_is_refused_before_reading(client, data_dir):
    big = b"\0" * (1024 * 1024 + 10)
    resp = client.post("/lego", data=form(big), content_type="multipart/form-data")
    assert resp.status_code == 413
    assert resp.get_json()["error_code"] == "upload_too_large" and "1 MB" in resp.get_json()["error"]
    assert files_under(data_dir / "jobs") == []
    resp = client.post("/lego", json=vst_json(big))
    assert resp.status_code == 413 and resp.get_json()["error_code"] == "upload_too_large"


@pytest.mark.parametrize("name,body,code", [
    ("no audio_data", vst_json(None), "missing_audio"),
    ("invalid base64", vst_json("!!!not base64!!!"), "invalid_base64"),
    ("base64 of nothing", vst_json("===="), "invalid_base64"),
    ("base64 of text", vst_json(b"hello, I am not a WAV file at all" * 50), "not_audio"),
    ("unknown track_name", vst_json(wav_bytes(2), track_name="tuba"), "invalid_track_type"),
    ("bpm as text", vst_json(wav_bytes(2), bpm="fast"), "invalid_bpm"),
    ("bpm missing", {k: v for k, v in vst_json(wav_bytes(2)).items() if k != "bpm"}, "missing_bpm"),
    ("batch_size 3", vst_json(wav_bytes(2), batch_size=3), "invalid_batch_size"),
    ("long caption", vst_json(wav_bytes(2), caption="y" * 5000), "caption_too_long"),
    ("seed too big", vst_json(wav_bytes(2), seed=2**40), "invalid_parameter"),
    ("guidance out of range", vst_json(wav_bytes(2), guidance_scale=99), "invalid_parameter"),
    ("bad time signature", vst_json(wav_bytes(2), time_signature="5/7"), "invalid_parameter"),
    ("bad audio_format", vst_json(wav_bytes(2), audio_format="aiff"), "invalid_audio_format"),
])
def test_json_bad_input(client, data_dir, name, body, code):
    assert_refused(client.post("/lego", json=body), 400, code, data_dir)


def test_malformed_json_and_non_object(client, data_dir):
    assert_refused(client.post("/lego", data=b'{"audio_data": "abc", ', content_type="application/json"), 400,
                   "malformed_json", data_dir)
    assert_refused(client.post("/lego", data=b"[1, 2]", content_type="application/json"), 400, "malformed_json", data_dir)


def test_unsupported_content_type(client, data_dir):
    resp = client.post("/lego", data=wav_bytes(1), content_type="audio/wav")
    assert resp.status_code == 415
    assert resp.get_json()["error_code"] == "unsupported_content_type"
    assert files_under(data_dir / "jobs") == []


@pytest.mark.parametrize("task_id,status,code", [
    ("0" * 32, 404, "task_not_found"),
    ("not-a-task", 400, "invalid_task_id"),
    ("A" * 32, 400, "invalid_task_id"),
    ("z" * 32, 400, "invalid_task_id"),
    ("0" * 31 + ".", 400, "invalid_task_id"),
])
def test_unknown_or_malformed_task_ids(client, task_id, status, code):
    for method, url in (("get", f"/lego/status/{task_id}"), ("get", f"/lego/{task_id}/audio"), ("delete", f"/lego/{task_id}")):
        resp = getattr(client, method)(url)
        body = resp.get_json()
        assert resp.status_code == status, (url, body)
        assert body["error_code"] == code and body["success"] is False


def test_error_shape_for_404_405_and_500(make_app):
    app = make_app()

    @app.get("/boom")
    def boom():
        raise RuntimeError("kaboom")

    client = app.test_client()
    resp = client.get("/nowhere")
    assert resp.status_code == 404 and resp.get_json()["error_code"] == "not_found"
    resp = client.put("/lego")
    assert resp.status_code == 405 and resp.get_json()["error_code"] == "method_not_allowed"
    assert "POST" in resp.headers["Allow"]
    resp = client.get("/boom")
    body = resp.get_json()
    assert resp.status_code == 500 and body == {"success": False, "error": body["error"], "error_code": "internal_error",
                                                "retryable": False}
    assert "kaboom" not in body["error"]  # no internals leak


def test_client_file_name_never_becomes_a_path(client, data_dir):
    resp = client.post("/lego", data=form(b"junk" * 100, filename="../../../../tmp/evil.wav"), content_type="multipart/form-data")
    assert resp.status_code == 400
    assert files_under(data_dir / "jobs") == []
    assert not (data_dir.parent / "evil.wav").exists()
