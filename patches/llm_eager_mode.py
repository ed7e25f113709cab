"""Patch 2: the language model's nano-vllm engine always starts eager.

`LLMHandler._initialize_5hz_lm_vllm` (acestep/llm_inference.py, CUDA only: it returns early
without CUDA) builds `nanovllm.LLM(model=..., enforce_eager=False, ...)`, so nano-vllm
captures CUDA graphs, which disturbs the sampler's RNG. Two installed shapes are handled:
- the official repository's method takes an `enforce_eager` argument: the wrapper passes True;
- ace-step15-fork 20260212 hard-codes False and imports `LLM` from `nanovllm` inside the call:
  for the duration of the call the wrapper puts a subclass of `nanovllm.LLM` that forces
  `enforce_eager=True` on the `nanovllm` module, and puts the original back afterwards.
This service never starts the language model; the patch keeps anyone who does reproducible.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

from patches._wrapping import APPLIED, Outcome, install, locate, remove

NAME = "llm_eager_mode"
ATTR = "_initialize_5hz_lm_vllm"


def find_owner(handler_class: type | None = None) -> tuple[type | None, str]:
    if handler_class is None:
        try:
            from acestep.llm_inference import LLMHandler as handler_class
        except Exception as exc:
            return None, f"acestep.llm_inference does not import: {type(exc).__name__}: {exc}"
    if ATTR not in handler_class.__dict__:
        return None, f"{handler_class.__qualname__} has no {ATTR}"
    return handler_class, f"{handler_class.__module__}.{handler_class.__qualname__}.{ATTR}"


def apply(handler_class: type | None = None) -> Outcome:
    owner, where, done = locate(NAME, ATTR, find_owner(handler_class))
    if done is not None:
        return done
    original = owner.__dict__[ATTR]
    install(owner, ATTR, NAME, _wrap(original))
    how = "passes enforce_eager=True" if _takes_flag(original) else "forces enforce_eager=True on nanovllm.LLM"
    return Outcome(NAME, APPLIED, f"wrapped {where}: {how}")


def undo(handler_class: type | None = None) -> bool:
    owner, _ = find_owner(handler_class)
    return owner is not None and remove(owner, ATTR, NAME)


def _takes_flag(function) -> bool:
    return "enforce_eager" in inspect.signature(function).parameters


def _wrap(original):
    signature = inspect.signature(original)
    takes_flag = _takes_flag(original)

    @functools.wraps(original)
    def _initialize_5hz_lm_vllm(*args, **kwargs):
        if takes_flag:
            bound = signature.bind(*args, **kwargs)
            bound.arguments["enforce_eager"] = True
            return original(*bound.args, **bound.kwargs)
        with eager_llm_class():
            return original(*args, **kwargs)

    return _initialize_5hz_lm_vllm


@contextlib.contextmanager
def eager_llm_class():
    """While open, `from nanovllm import LLM` yields a subclass that always passes enforce_eager=True."""
    try:
        import nanovllm
    except ImportError:
        # The handler's own import fails the same way and reports it; nothing to force.
        yield
        return
    original = nanovllm.LLM

    class EagerLLM(original):
        def __init__(self, *args, **kwargs):
            kwargs["enforce_eager"] = True
            super().__init__(*args, **kwargs)

    EagerLLM.__name__, EagerLLM.__qualname__, EagerLLM.__module__ = (
        original.__name__, original.__qualname__, original.__module__)
    nanovllm.LLM = EagerLLM
    try:
        yield
    finally:
        nanovllm.LLM = original
