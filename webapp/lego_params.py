"""The parameters of one lego job, validated from either protocol into one shape.

Both the seed's multipart form and the gary4juce plugin's JSON end here, so the rules are the
same whatever the transport: every field is checked for type and range, a bad one is a 400
with its own error code, and fields this service cannot honour on a T4 (lyrics, LoRA) are
accepted and named in `warnings`. Values become runner flags (an argument list), never a shell
string or a path.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping

from runner import contract
from webapp.errors import ApiError

TRACKS = contract.TRACKS
OUTPUT_FORMATS = ("mp3", "wav", "flac")
assert set(OUTPUT_FORMATS) == set(contract.OUTPUT_FORMATS)
MIME_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav", "flac": "audio/flac"}
_ACCEPT_FORMATS = {"audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/wav": "wav", "audio/x-wav": "wav",
                   "audio/wave": "wav", "audio/vnd.wave": "wav", "audio/flac": "flac", "audio/x-flac": "flac"}
BPM_RANGE = contract.BPM_RANGE
MAX_CAPTION_CHARS = 512  # stricter than the runner's own limit
assert MAX_CAPTION_CHARS <= contract.MAX_CAPTION_CHARS
MAX_TEXT_CHARS = 20_000  # lyrics are ignored, but not without bound
GUIDANCE_RANGE = contract.GUIDANCE_RANGE
SEED_MAX = 2**32 - 1
RANDOM_SEED_BELOW = 2**31  # a seed the service picks is echoed at once, so the client can reproduce it
TIME_SIGNATURES = ("2", "3", "4", "6")


@dataclass
class LegoParams:
    track: str
    bpm: int
    steps: int
    batch_size: int = 1
    key_scale: str | None = None
    caption: str | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    time_signature: str | None = None
    repaint_start: float | None = None
    repaint_end: float | None = None
    output_format: str = "wav"
    claimed_duration_s: float | None = None
    warnings: list[str] = field(default_factory=list)

    def runner_args(self) -> dict:
        """The job's part of the runner's job line (the runner's LegoArgs fields, DESIGN.md section 4)."""
        args = {"track": self.track, "bpm": self.bpm, "steps": self.steps, "batch_size": self.batch_size,
                "format": self.output_format}
        optional = {"key": self.key_scale, "caption": self.caption, "seed": self.seed, "guidance_scale": self.guidance_scale,
                    "time_signature": self.time_signature, "repaint_start": self.repaint_start, "repaint_end": self.repaint_end}
        args.update({name: value for name, value in optional.items() if value not in (None, "")})
        return args

    def check_against_duration(self, seconds: float) -> None:
        """The repaint window must lie inside the clip, known once the audio is decoded."""
        if self.repaint_start is not None and self.repaint_start >= seconds:
            raise ApiError("invalid_parameter", f"repaint_start {self.repaint_start:g} s lies beyond the {seconds:.2f} s clip; "
                                                "use a start inside the clip, or omit it for the whole clip.")
        if self.repaint_end is not None and self.repaint_end > seconds + 1e-6:
            raise ApiError("invalid_parameter", f"repaint_end {self.repaint_end:g} s lies beyond the {seconds:.2f} s clip; "
                                                "use an end inside the clip, or -1 for its end.")


def from_form(form: Mapping[str, str], settings, accept: str = "") -> LegoParams:
    """The seed's multipart call: answers MP3 unless `format=` or Accept asks for another."""
    fmt = _text(form.get("format"))
    if fmt is None:
        fmt = _format_from_accept(accept) or "mp3"
    return _build(form, settings, track_field="track_type", output_format=fmt.lower(),
                  claimed_duration=_float(form.get("audio_duration"), "audio_duration", minimum=0.001))


def from_json(body: Mapping[str, Any], settings) -> LegoParams:
    """The gary4juce plugin's JSON (DESIGN.md section 5): answers WAV unless `audio_format` says otherwise."""
    fmt = _text(body.get("audio_format")) or "wav"
    track_field = "track_name" if "track_name" in body else "track_type"
    return _build(body, settings, track_field=track_field, output_format=fmt.lower(),
                  claimed_duration=_float(body.get("audio_duration"), "audio_duration", minimum=0.001))


def _build(src: Mapping[str, Any], settings, *, track_field: str, output_format: str,
           claimed_duration: float | None) -> LegoParams:
    warnings: list[str] = []
    track = _track(src.get(track_field), track_field)
    bpm = _bpm(src.get("bpm"), warnings)
    if output_format not in OUTPUT_FORMATS:
        raise ApiError("invalid_audio_format", f"The output format {output_format[:20]!r} is not one of mp3, wav, flac.")
    batch = _int(src.get("batch_size"), "batch_size", code="invalid_batch_size")
    if batch is None:
        batch = 1
    if batch not in contract.BATCH_SIZES:
        raise ApiError("invalid_batch_size", f"batch_size {batch} is not allowed: send 1 or 2.")
    steps = _steps(src.get("inference_steps"), settings, warnings)
    caption = _text(src.get("caption"))
    if caption is not None and len(caption) > MAX_CAPTION_CHARS:
        raise ApiError("caption_too_long", f"The caption has {len(caption)} characters; the limit is {MAX_CAPTION_CHARS}. Shorten it.")
    seed = _int(src.get("seed"), "seed")
    if seed is not None and seed > SEED_MAX:
        raise ApiError("invalid_parameter", f"seed must be between 0 and {SEED_MAX} (or -1 for a random seed).")
    if seed is None or seed < 0:
        seed = secrets.randbelow(RANDOM_SEED_BELOW)  # -1 or none: random, chosen here and echoed in every answer
    guidance = _float(src.get("guidance_scale"), "guidance_scale", minimum=GUIDANCE_RANGE[0], maximum=GUIDANCE_RANGE[1])
    params = LegoParams(
        track=track, bpm=bpm, steps=steps, batch_size=batch, key_scale=_key_scale(src.get("key_scale"), warnings),
        caption=caption, seed=seed, guidance_scale=guidance, time_signature=_time_signature(src.get("time_signature")),
        output_format=output_format, claimed_duration_s=claimed_duration, warnings=warnings,
    )
    _repaint_window(src, params)
    _unsupported(src, warnings)
    return params


def _track(value: Any, field_name: str) -> str:
    text = _text(value)
    if text is None:
        raise ApiError("invalid_track_type", f"{field_name} is required: send one of vocals, backing_vocals, drums.")
    norm = text.strip().lower().replace(" ", "_").replace("-", "_")
    if norm not in TRACKS:
        raise ApiError("invalid_track_type", f"{field_name} {text[:40]!r} is not one of vocals, backing_vocals, drums.")
    return norm


def _bpm(value: Any, warnings: list[str]) -> int:
    """A whole tempo; a DAW's decimal tempo (120.5) is rounded, and the answer says so."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ApiError("missing_bpm")
    exact = _float(value, "bpm", code="invalid_bpm") if not isinstance(value, bool) else None
    if exact is None:
        raise ApiError("invalid_bpm", "bpm must be a number (the source's tempo).")
    bpm = int(round(exact))
    lo, hi = BPM_RANGE
    if not lo <= bpm <= hi:
        raise ApiError("invalid_bpm", f"bpm {exact:g} is outside {lo}..{hi}; send the source's tempo in beats per minute.")
    if bpm != exact:
        warnings.append(f"bpm {exact:g} was rounded to {bpm}: the model takes a whole tempo.")
    return bpm


def _steps(value: Any, settings, warnings: list[str]) -> int:
    steps = _int(value, "inference_steps")
    if steps is None:
        return settings.lego_steps
    if steps < settings.lego_min_steps:
        warnings.append(f"inference_steps {steps} is below this service's minimum; {settings.lego_min_steps} were used.")
        return settings.lego_min_steps
    if steps > settings.lego_max_steps:
        warnings.append(f"inference_steps {steps} is above this service's maximum; {settings.lego_max_steps} were used.")
        return settings.lego_max_steps
    return steps


def _key_scale(value: Any, warnings: list[str]) -> str | None:
    """The runner's own spelling ("A minor") of what a musician sends ("Am", "Bbmaj"), echoed in `warnings`."""
    text = _text(value)
    if text is None:
        return None
    key = contract.normalise_key(text)
    if key is None:
        raise ApiError("invalid_key_scale", f"key_scale {text[:30]!r} is not a key: send e.g. 'C major', 'F# minor', 'Am' or 'Bbmaj'.")
    if " ".join(text.split()).lower() != key.lower():
        warnings.append(f"key_scale {text!r} was read as {key!r}.")
    return key


def _time_signature(value: Any) -> str | None:
    """Beats per bar as the runner takes it: '4' (also accepts '4/4', '3/4', '6/8')."""
    text = _text(value)
    if text is None:
        return None
    numerator, _, denominator = text.partition("/")
    numerator = numerator.strip()
    if numerator not in TIME_SIGNATURES or (denominator and denominator.strip() not in ("4", "8")):
        raise ApiError("invalid_parameter", f"time_signature {text[:10]!r} is not supported; send 2, 3, 4 or 6 (or 4/4, 3/4, 6/8).")
    return numerator


def _repaint_window(src: Mapping[str, Any], params: LegoParams) -> None:
    start = _float(src.get("repaint_start"), "repaint_start", minimum=0.0)
    end = _float(src.get("repaint_end"), "repaint_end", minimum=-1.0)
    if end is not None and end < 0 and end != -1.0:
        raise ApiError("invalid_parameter", "repaint_end must be a time in seconds, or -1 for the end of the clip.")
    if start is not None and end is not None and end >= 0 and end <= start:
        raise ApiError("invalid_parameter", f"repaint_end {end:g} s must come after repaint_start {start:g} s.")
    params.repaint_start, params.repaint_end = start, end


def _unsupported(src: Mapping[str, Any], warnings: list[str]) -> None:
    lyrics = src.get("lyrics")
    if isinstance(lyrics, str) and len(lyrics) > MAX_TEXT_CHARS:
        raise ApiError("invalid_parameter", f"lyrics are limited to {MAX_TEXT_CHARS} characters.")
    if _text(lyrics) is not None and _text(lyrics).lower() not in ("[instrumental]", "[inst]"):
        warnings.append("lyrics were ignored: this service generates wordless stems (the lego task runs without the language model).")
    lora = src.get("lora")
    if lora not in (None, "", False, [], {}) and str(lora).lower() not in ("none", "null"):
        warnings.append("lora was ignored: this service runs the base model without LoRA adapters.")
        if src.get("lora_scale") not in (None, ""):
            warnings.append("lora_scale was ignored along with lora.")


def _format_from_accept(accept: str) -> str | None:
    for part in (accept or "").split(","):
        mime = part.split(";")[0].strip().lower()
        if mime in _ACCEPT_FORMATS:
            return _ACCEPT_FORMATS[mime]
    return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        else:
            raise ApiError("invalid_parameter", f"Expected text, got {type(value).__name__}.")
    if "\x00" in value:
        raise ApiError("invalid_parameter", "Text fields may not contain NUL characters.")
    value = value.strip()
    return value or None


def _int(value: Any, name: str, code: str = "invalid_parameter") -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ApiError(code, f"{name} must be a whole number.")
    if isinstance(value, int):
        if abs(value) > 2**63:
            raise ApiError(code, f"{name} is far too large; send an ordinary whole number.")
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ApiError(code, f"{name} {value:g} must be a whole number.")
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[+-]?\d{1,12}", text):
            return int(text)
        if re.fullmatch(r"[+-]?\d{1,12}\.0*", text):
            return int(float(text))
    raise ApiError(code, f"{name} {str(value)[:20]!r} must be a whole number.")


def _float(value: Any, name: str, minimum: float | None = None, maximum: float | None = None,
           code: str = "invalid_parameter") -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ApiError(code, f"{name} must be a number.")
    try:
        number = float(value)
    except OverflowError:
        raise ApiError(code, f"{name} is far too large; send an ordinary number.") from None
    except (TypeError, ValueError):
        raise ApiError(code, f"{name} {str(value)[:20]!r} must be a number.") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ApiError(code, f"{name} must be a finite number.")
    if minimum is not None and number < minimum:
        raise ApiError("invalid_parameter", f"{name} {number:g} is below its minimum {minimum:g}.")
    if maximum is not None and number > maximum:
        raise ApiError("invalid_parameter", f"{name} {number:g} is above its maximum {maximum:g}.")
    return number
