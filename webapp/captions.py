"""The default caption of each track type, as the page shows it before the musician edits it.

The runner applies these when a job carries no caption (runner/tracks.py). The web tier may not
import the runner's package (DESIGN.md section 2: the two share only the runner's command line
and events), so the page's copy lives here; tests/test_page_routes.py holds the two equal.
"""
from __future__ import annotations

DEFAULT_CAPTIONS = {
    "vocals": "soulful indie vocalist, warm, wordless melody, expressive",
    "backing_vocals": "background vocals, close harmony, wordless, warm",
    "drums": "live acoustic drum kit, tight kick and snare, brushed hi-hats",
}
