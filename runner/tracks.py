"""The three stems this service makes, their default captions and the lego instruction."""

from runner.contract import TRACKS  # noqa: F401 - defined once, in the contract

DEFAULT_CAPTIONS = {
    "vocals": "soulful indie vocalist, warm, wordless melody, expressive",
    "backing_vocals": "background vocals, close harmony, wordless, warm",
    "drums": "live acoustic drum kit, tight kick and snare, brushed hi-hats",
}


def lego_instruction(track: str) -> str:
    """ACE-Step's lego instruction; the track name is upper-cased (DESIGN.md section 3)."""
    return f"Generate the {track.upper()} track based on the audio context:"
