"""Runtime fixes for the installed `acestep` package, applied before its model loads.

`apply()` wraps three installed functions (never copies their bodies), once per process, and
returns and logs (logger "patches") one outcome per patch: applied, already fixed upstream,
or target not found. Importing this package imports neither torch nor acestep: `apply()`
does, so the web layer may import it freely.

1. lego_source_context     lego conditions on the whole source instead of silence
2. llm_eager_mode          the language model's nano-vllm engine starts with enforce_eager=True
3. graph_capture_fallback  a failed nano-vllm graph capture restores the RNG and continues eager
"""
from __future__ import annotations

import logging

from patches import graph_capture_fallback, lego_source_context, llm_eager_mode
from patches._wrapping import APPLIED, LOG, NOT_FOUND, STATUSES, UPSTREAM_FIXED, Outcome

PATCHES = (lego_source_context, llm_eager_mode, graph_capture_fallback)

__all__ = ["apply", "undo", "Outcome", "APPLIED", "UPSTREAM_FIXED", "NOT_FOUND", "STATUSES", "PATCHES"]


def apply() -> dict[str, Outcome]:
    """Apply every patch (idempotent); returns {patch name: Outcome}. Unexpected errors propagate."""
    outcomes = {}
    for patch in PATCHES:
        outcome = patch.apply()
        LOG.log(logging.WARNING if outcome.status == NOT_FOUND else logging.INFO, "%s", outcome)
        outcomes[outcome.name] = outcome
    return outcomes


def undo() -> dict[str, bool]:
    """Put the original functions back (for tests); returns {patch name: whether one was removed}."""
    return {patch.NAME: patch.undo() for patch in PATCHES}
