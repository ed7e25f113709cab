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
encoded source.

Whether the fix is needed is decided by behaviour, not by reading one function: the probe
(patches/lego_probe.py) runs the installed `generate_music` up to the conditioning batch and
looks at `src_latents`. The official repository fixed the silencing in another place (its
conditioning masks keep the source for lego, 2026-03-11) while `prepare_padding_info` still ends
the window at the source's length: there the probe sees the source and the patch reports
"already fixed upstream" without wrapping anything. Where the source is silenced, the wrapper is
installed and the probe runs again: only if the source then reaches the conditioning is the
outcome "applied"; otherwise the wrapper is removed and the outcome is "target not found".
"""
from __future__ import annotations

import functools
import inspect
from numbers import Real

from patches import lego_probe
from patches._wrapping import (
    APPLIED,
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


def _import_handler() -> tuple[type | None, str]:
    try:
        from acestep.handler import AceStepHandler
    except Exception as exc:  # ImportError, or the package failing at import time
        return None, f"acestep.handler does not import: {type(exc).__name__}: {exc}"
    return AceStepHandler, ""


def find_owner(handler_class: type | None = None) -> tuple[type | None, str]:
    """The class that defines `prepare_padding_info` for AceStepHandler (itself or a mixin)."""
    if handler_class is None:
        handler_class, why = _import_handler()
        if handler_class is None:
            return None, why
    owner = defining_class(handler_class, ATTR)
    if owner is None:
        return None, f"{handler_class.__qualname__} has no {ATTR}"
    return owner, f"{owner.__module__}.{owner.__qualname__}.{ATTR}"


def apply(handler_class: type | None = None) -> Outcome:
    if handler_class is None:
        handler_class, why = _import_handler()
        if handler_class is None:
            return Outcome(NAME, NOT_FOUND, why)
    owner, where, done = locate(NAME, ATTR, find_owner(handler_class))
    if done is not None:
        return done
    original = owner.__dict__[ATTR]
    parameters = inspect.signature(original).parameters
    missing = [p for p in NEEDED_PARAMETERS if p not in parameters]
    if missing:
        return Outcome(NAME, NOT_FOUND, f"{where} has no parameter {', '.join(missing)}; its API changed")
    try:
        if lego_probe.source_reaches_conditioning(handler_class):
            return Outcome(NAME, UPSTREAM_FIXED, "the installed generate_music already conditions lego on the source; nothing wrapped")
        install(owner, ATTR, NAME, _wrap(original))
        if lego_probe.source_reaches_conditioning(handler_class):
            return Outcome(NAME, APPLIED, f"wrapped {where}: lego's conditioning now holds the source, not silence")
    except Exception as exc:  # the probe could not run this acestep: say so, leave it unpatched
        remove(owner, ATTR, NAME)
        return Outcome(NAME, NOT_FOUND, f"the probe could not run the installed code ({type(exc).__name__}: {exc})")
    remove(owner, ATTR, NAME)
    return Outcome(NAME, NOT_FOUND, f"wrapping {where} did not bring the source into lego's conditioning")


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
