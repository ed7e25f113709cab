"""The page in a real browser: Debian's chromium driven by Playwright, against the service started
the README's way (gunicorn) with the real runner on the tiny random checkpoint.

One walk through the whole job (upload a synthesized source, tempo and key prefilled, generate,
progress to 100, play source and stem together, download, the stem's frame count equal to the
source's, a second job cancelled mid-generation) and one for the API key dialog. The browser's
console must stay free of errors. The finished page's screenshot is kept in the test's tmp folder
(pytest keeps the last three runs' under /tmp/pytest-of-$USER/; its path is printed, `pytest -s`
shows it), and copied to $PAGE_SCREENSHOT when that is set.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf

from conftest import pid_alive, wait_for
from playwright.sync_api import expect
from music_synth import drum_pattern, triads, wav_bytes
from test_web_gunicorn import start_gunicorn  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SOURCE_BPM, SOURCE_KEY, SOURCE_SECONDS, SOURCE_RATE = 120, "A minor", 4.0, 44100


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/system-deps.sh --browser (make test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--autoplay-policy=no-user-gesture-required"])
        yield browser
        browser.close()


class Page:
    """A browser tab on the service that records every console error and page error."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(accept_downloads=True, viewport={"width": 1180, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda msg: self.errors.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.goto(url)
        self.page.wait_for_selector("body[data-ready=true]", timeout=20_000)

    def tid(self, name: str):
        return self.page.get_by_test_id(name)

    def close(self):
        self.context.close()


def synthesized_source(path: Path) -> Path:
    """A rock beat at 120 BPM under i-iv-V-i chords in A minor, stereo, 44.1 kHz."""
    drums = drum_pattern(SOURCE_BPM, SOURCE_SECONDS, SOURCE_RATE)
    chords = np.tile(triads(9, True, seconds_per_chord=0.5, repeats=1, rate=SOURCE_RATE), 4)[: len(drums)]
    path.write_bytes(wav_bytes((0.6 * drums + 0.8 * chords).astype(np.float32), SOURCE_RATE))
    return path


def test_the_whole_job_in_a_browser(browser, start_gunicorn, fake_queue, tiny_checkpoint, tmp_path):
    server, data_dir = start_gunicorn(ACESTEP_CHECKPOINTS=str(tiny_checkpoint), LEGO_STEPS="3", LEGO_MAX_STEPS="200")
    source = synthesized_source(tmp_path / "source.wav")
    frames = sf.info(str(source)).frames
    tab = Page(browser, server.url + "/")
    page = tab.page
    try:
        assert "Demo model" in tab.tid("model-badge").inner_text()  # the demo says so plainly

        # the source: its waveform and duration at once, tempo and key prefilled from POST /analyze
        tab.tid("file-input").set_input_files(str(source))
        expect(tab.tid("source-info")).to_have_text(re.compile(r"^0:04\.0 · stereo"))
        expect(tab.tid("bpm")).to_have_value(re.compile(r"^\d+$"), timeout=60_000)
        assert tab.tid("bpm").input_value() == str(SOURCE_BPM)
        assert tab.tid("key").input_value() == SOURCE_KEY
        assert "half time" in tab.tid("bpm-hint").inner_text()  # 120 or 60: flagged, with a button
        assert tab.tid("caption").input_value() == "soulful indie vocalist, warm, wordless melody, expressive"
        tab.tid("track-drums").check(force=True)
        assert tab.tid("caption").input_value() == "live acoustic drum kit, tight kick and snare, brushed hi-hats"

        # generate two candidates; record every progress value the bar shows
        tab.tid("batch-2").check(force=True)
        tab.tid("format").select_option("wav")
        tab.tid("generate").click()
        page.wait_for_selector("[data-testid=job-card]:not([hidden])")
        page.evaluate("""() => { window.progressSeen = [];
            new MutationObserver(() => window.progressSeen.push(Number(document.getElementById('progress').getAttribute('aria-valuenow'))))
              .observe(document.getElementById('progress'), {attributes: true, attributeFilter: ['aria-valuenow']}); }""")
        page.wait_for_selector("[data-testid=job-card][data-state=completed]", timeout=240_000)
        seen = page.evaluate("window.progressSeen")
        assert seen and seen[-1] == 100 and seen == sorted(seen), seen
        assert tab.tid("job-percent").inner_text() == "100%"

        # play source and stem together; A/B; mute
        assert tab.tid("lane-stem").is_visible() and tab.tid("ab").is_visible()
        tab.tid("play").click()
        page.wait_for_selector(".transport[data-state=playing][data-sources='2']")
        expect(tab.tid("clock")).not_to_have_text(re.compile(r"^0:00\.0 "))
        tab.tid("candidate-1").click()
        page.wait_for_selector("[data-testid=lane-stem][data-candidate='1']")
        page.wait_for_selector(".transport[data-state=playing][data-sources='2']")
        tab.tid("mute-source").click()
        assert tab.tid("mute-source").get_attribute("aria-pressed") == "true"
        tab.tid("play").click()  # pause
        page.wait_for_selector(".transport[data-state=stopped]")

        # download the first candidate: the service's own file, the source's frame count
        with page.expect_download() as info:
            tab.tid("download-0").click()
        stem_path = tmp_path / info.value.suggested_filename
        info.value.save_as(stem_path)
        stem = sf.info(str(stem_path))
        assert stem_path.suffix == ".wav" and stem.frames == frames and stem.samplerate == SOURCE_RATE

        shot = tmp_path / "page-finished.png"
        page.screenshot(path=str(shot), full_page=True)
        keep = os.environ.get("PAGE_SCREENSHOT")
        if keep:
            shutil.copy(shot, keep)
        print(f"\nscreenshot of the finished page: {shot}")

        # a second, long job, cancelled while its runner works: the runner stops and the GPU tokens go back
        tab.tid("batch-2").evaluate("el => { el.checked = false; document.querySelector('input[name=batch_size][value=\"1\"]').checked = true; }")
        tab.tid("steps").fill("200")  # the runner's most
        tab.tid("generate").click()
        expect(tab.tid("progress")).to_have_attribute("data-state", "running", timeout=120_000)
        task = page.evaluate("document.getElementById('job-id').textContent").split()[-1]
        tab.tid("cancel").click()
        page.wait_for_selector("[data-testid=job-card][data-state=cancelled]", timeout=30_000)
        assert "Cancelled" in tab.tid("job-stage").inner_text()
        started = next(e for e in server.events("job_runner_started") if e["job_id"].startswith(task))
        cancelled = started["job_id"]
        status = requests.get(f"{server.url}/lego/status/{cancelled}", timeout=5).json()
        assert status["state"] == "cancelled" and status["error_code"] == "job_cancelled"
        wait_for(lambda: len(fake_queue.releases()) == 2, timeout=20, what="the cancelled job's tokens to be released")
        # one session per acquire: acestep-lego-<job id>-<random>
        ours = [s for sid, s in fake_queue.sessions.items() if sid.startswith(f"acestep-lego-{cancelled}-")]
        assert len(ours) == 1, (list(fake_queue.sessions), cancelled)
        session = ours[0]
        assert session["release_status"] == "failed", (session, fake_queue.releases())
        assert not pid_alive(started["pid"])
        # stopped by us: SIGTERM (5), or SIGKILL (-9) when a busy machine keeps it past the grace period
        assert [e["exit_code"] for e in server.events("job_runner_exited") if e["job_id"] == cancelled] in ([5], [-9])

        assert tab.errors == []
    finally:
        tab.close()


def test_the_api_key_is_asked_once(browser, start_gunicorn, fake_checkpoints, tmp_path):
    server, _ = start_gunicorn(ACESTEP_CHECKPOINTS=str(fake_checkpoints), API_KEY="s3cret-key")
    source = synthesized_source(tmp_path / "source.wav")
    tab = Page(browser, server.url + "/")
    page = tab.page
    try:
        assert "Model:" in tab.tid("model-badge").inner_text()  # a real-looking folder: no demo label
        tab.tid("file-input").set_input_files(str(source))
        page.wait_for_selector("[data-testid=key-dialog][open]")  # POST /analyze answered 401
        tab.tid("key-input").fill("wrong")
        tab.tid("key-ok").click()
        page.wait_for_selector("[data-testid=key-dialog][open]")  # refused: asked again, saying so
        assert "refused" in page.locator("#key-reason").inner_text()
        tab.tid("key-input").fill("s3cret-key")
        tab.tid("key-ok").click()
        expect(tab.tid("bpm")).to_have_value(re.compile(r"^\d+$"), timeout=60_000)
        assert tab.tid("key").input_value() == SOURCE_KEY
        # a second file: the key is sent at once, no question
        tab.tid("file-input").set_input_files(str(source))
        expect(tab.tid("analysis-status")).to_have_text(re.compile(r"^tempo and key found"))
        assert not tab.tid("key-dialog").is_visible()
        refused = [e for e in tab.errors if "401" not in e]
        assert refused == [] and len(tab.errors) == 2, tab.errors  # the two 401 answers, nothing else
    finally:
        tab.close()
