"""Patch 3: when nano-vllm's CUDA-graph capture fails, continue eager with the RNG untouched.

`ModelRunner.__init__` calls `capture_cudagraph()` unless `enforce_eager`; a failure there
(out of memory, an unsupported card, a driver quirk) kills the whole language model, and a
capture that got part way has already advanced the random number generators. The wrapper
saves the CPU and CUDA RNG states before capture; if capture raises, it puts both back,
drops any half-built graphs, sets the runner (and its config) to `enforce_eager=True` so
`run_model` and `exit` take their eager paths, logs why, and returns normally.

nano-vllm imports only with `flash_attn` (GPU wheels); without it this patch reports
"target not found", which is right: no language model can start there either.
"""
from __future__ import annotations

import functools
import sys

from patches._wrapping import APPLIED, LOG, Outcome, install, locate, remove

NAME = "graph_capture_fallback"
ATTR = "capture_cudagraph"
PARTIAL_CAPTURE_ATTRIBUTES = ("graphs", "graph_pool", "graph_vars", "graph_bs")


def find_owner(runner_class: type | None = None) -> tuple[type | None, str]:
    if runner_class is None:
        runner_class, why = _import_model_runner()
        if runner_class is None:
            return None, why
    if ATTR not in runner_class.__dict__:
        return None, f"{runner_class.__qualname__} has no {ATTR}"
    return runner_class, f"{runner_class.__module__}.{runner_class.__qualname__}.{ATTR}"


def _import_model_runner() -> tuple[type | None, str]:
    """Import nano-vllm's ModelRunner; after a failed attempt, forget the half-imported modules
    so that the next attempt fails (or succeeds) the same clean way."""
    before = set(sys.modules)
    try:
        from nanovllm.engine.model_runner import ModelRunner
    except Exception as exc:
        for module in set(sys.modules) - before:
            if module == "nanovllm" or module.startswith("nanovllm."):
                del sys.modules[module]
        return None, f"nanovllm.engine.model_runner does not import: {type(exc).__name__}: {exc}"
    return ModelRunner, ""


def apply(runner_class: type | None = None) -> Outcome:
    owner, where, done = locate(NAME, ATTR, find_owner(runner_class))
    if done is not None:
        return done
    install(owner, ATTR, NAME, _wrap(owner.__dict__[ATTR]))
    return Outcome(NAME, APPLIED, f"wrapped {where}")


def undo(runner_class: type | None = None) -> bool:
    owner, _ = find_owner(runner_class)
    return owner is not None and remove(owner, ATTR, NAME)


def _wrap(original):
    @functools.wraps(original)
    def capture_cudagraph(self, *args, **kwargs):
        import torch

        cpu_state = torch.get_rng_state()
        cuda_saved = _cuda_rng_states(torch)
        try:
            return original(self, *args, **kwargs)
        except Exception as exc:
            torch.set_rng_state(cpu_state)
            cuda_restored = _restore_cuda_rng_states(torch, cuda_saved)
            _continue_eager(self, original)
            LOG.warning(
                "%s: CUDA graph capture failed (%s: %s); CPU RNG restored, CUDA RNG %s; continuing eager",
                NAME, type(exc).__name__, exc, cuda_restored,
            )
            return None

    return capture_cudagraph


def _cuda_rng_states(torch):
    """The CUDA generators' states, where CUDA is already in use (never initialises CUDA itself).

    Besides the plain states, each generator's `clone_state()`: a capture that fails leaves the
    generators in capture mode ("Offset increment outside graph capture"), which
    `set_rng_state_all` does not undo and `graphsafe_set_state(clone)` does (checked on an H200,
    torch 2.11)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    generators = list(torch.cuda.default_generators)
    graph_safe = all(hasattr(g, "clone_state") and hasattr(g, "graphsafe_set_state") for g in generators)
    return torch.cuda.get_rng_state_all(), ([g.clone_state() for g in generators] if graph_safe else None)


def _restore_cuda_rng_states(torch, saved) -> str:
    if saved is None:
        return "not in use"
    states, clones = saved
    try:
        if clones is not None:
            for generator, clone in zip(torch.cuda.default_generators, clones):
                generator.graphsafe_set_state(clone)
        torch.cuda.set_rng_state_all(states)
        return "restored"
    except Exception as exc:  # a capture can leave the context unusable; say so, do not hide it
        LOG.error("%s: could not restore the CUDA RNG state: %s: %s", NAME, type(exc).__name__, exc)
        return f"NOT restored ({type(exc).__name__})"


def _continue_eager(runner, original) -> None:
    runner.enforce_eager = True
    config = getattr(runner, "config", None)
    if config is not None and hasattr(config, "enforce_eager"):
        config.enforce_eager = True
    for attribute in PARTIAL_CAPTURE_ATTRIBUTES:
        runner.__dict__.pop(attribute, None)
    reset_context = getattr(original, "__globals__", {}).get("reset_context")
    if callable(reset_context):
        reset_context()
