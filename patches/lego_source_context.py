"""Patch 1: lego must see the whole source, not silence.

The bug, as it reads in ace-step15-fork 20260212 (`acestep/handler.py`):
`generate_music` turns a repainting end of -1 into None and calls
`prepare_padding_info(...)`, which returns `(repainting_start_batch, repainting_end_batch,
target_wavs)`. With a source and a missing end it sets `repainting_end_batch` to
`[source duration]` for repaint *and* lego. `_prepare_batch` then sees start 0 < end and takes
its repainting branch: the chunk mask covers the whole clip and `src_latents` over that range
are replaced by `silence_latent`. For lego that range is everything, so the DiT is conditioned
on silence and the generated stem ignores the source.

The fix: for lego with a source and a missing or negative end, the second return value is None.
`_prepare_batch` then takes its full-mask branch, which keeps `src_latents` equal to the
encoded source. The official repository later made the same change inside the function; there
the probe below sees None already and the patch reports "already fixed upstream".
"""
from __future__ import annotations

import functools
import inspect
from numbers import Real

from patches._wrapping import (
    APPLIED,
    LOG,
    NOT_FOUND,
    UPSTREAM_FIXED,
    Outcome,
    defining_class,
    install,
    locate,
    remove,
)

NAME = "lego_source_context"
ATTR = "prepare_padding_info"
NEEDED_PARAMETERS = ("processed_src_audio", "repainting_end", "is_lego_task")
SAMPLE_RATE = 48000


def find_owner(handler_class: type | None = None) -> tuple[type | None, str]:
    """The class that defines `prepare_padding_info` for AceStepHandler (itself or a mixin)."""
    if handler_class is None:
        try:
            from acestep.handler import AceStepHandler as handler_class
        except Exception as exc:  # ImportError, or the package failing at import time
            return None, f"acestep.handler does not import: {type(exc).__name__}: {exc}"
    owner = defining_class(handler_class, ATTR)
    if owner is None:
        return None, f"{handler_class.__qualname__} has no {ATTR}"
    return owner, f"{owner.__module__}.{owner.__qualname__}.{ATTR}"


def apply(handler_class: type | None = None) -> Outcome:
    owner, where, done = locate(NAME, ATTR, find_owner(handler_class))
    if done is not None:
        return done
    original = owner.__dict__[ATTR]
    parameters = inspect.signature(original).parameters
    missing = [p for p in NEEDED_PARAMETERS if p not in parameters]
    if missing:
        return Outcome(NAME, NOT_FOUND, f"{where} has no parameter {', '.join(missing)}; its API changed")
    if _upstream_keeps_source(original):
        return Outcome(NAME, UPSTREAM_FIXED, f"{where} already returns None for a lego end of -1")
    install(owner, ATTR, NAME, _wrap(original))
    return Outcome(NAME, APPLIED, f"wrapped {where}")


def undo(handler_class: type | None = None) -> bool:
    owner, _ = find_owner(handler_class)
    return owner is not None and remove(owner, ATTR, NAME)


def wants_whole_source(arguments: dict) -> bool:
    """Lego, with a source, and no usable end: the case the conditioning must not silence."""
    end = arguments.get("repainting_end")
    open_end = end is None or (isinstance(end, Real) and end < 0)
    return bool(arguments.get("is_lego_task")) and arguments.get("processed_src_audio") is not None and open_end


def _wrap(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def prepare_padding_info(*args, **kwargs):
        result = original(*args, **kwargs)
        if wants_whole_source(signature.bind(*args, **kwargs).arguments) and result[1] is not None:
            result = (result[0], None, *result[2:])
        return result

    return prepare_padding_info


class _ProbeHost:
    """Stands in for `self`: the lego-with-source path reads nothing from it; the fallbacks make silence."""

    def create_target_wavs(self, duration_seconds):
        import torch

        return torch.zeros(2, int(duration_seconds * SAMPLE_RATE))


def _upstream_keeps_source(original) -> bool:
    """Call the installed function once on a 0.1 s source, lego, end None: does it return None already?"""
    import torch

    probe = {
        "actual_batch_size": 1,
        "processed_src_audio": torch.full((2, SAMPLE_RATE // 10), 0.1),
        "audio_duration": None,
        "repainting_start": 0.0,
        "repainting_end": None,
        "is_repaint_task": False,
        "is_lego_task": True,
        "is_cover_task": False,
        "can_use_repainting": True,
    }
    parameters = inspect.signature(original).parameters
    try:
        result = original(_ProbeHost(), **{k: v for k, v in probe.items() if k in parameters})
        return result[1] is None
    except Exception as exc:
        LOG.warning("%s: probing %s failed (%s: %s); wrapping it anyway", NAME, ATTR, type(exc).__name__, exc)
        return False
