"""Engines: the code that turns a validated LegoJob into stems (DESIGN.md section 3).

Each engine pulls in a heavy stack of its own (diffusers' AceStepPipeline; the official ACE-Step
package), and the two do not even install side by side (ACE-Step wants transformers<4.58, the
diffusers port transformers 5): the runner imports an engine, and its stack, only when a job
needs it. Nothing here imports torch.
"""
from __future__ import annotations

import importlib
import os
import sys
import time

from runner.contract import ENGINE_NAMES, speedup_names
from runner.engines.base import Engine
from runner.events import checkpoint_error

# The heavy modules each engine's job imports (for the import timing and the image's import check).
ENGINE_MODULES = {
    "diffusers": ("runner.engines.diffusers_engine", "diffusers.pipelines.ace_step.pipeline_ace_step"),
    "acestep": ("runner.engines.acestep_engine", "patches", "acestep.handler", "acestep.inference",
                "acestep.model_downloader"),
}
# What loading the `compile` switch's saved blocks imports (Dynamo, AOTAutograd, Inductor and its
# Triton runtime: seconds of Python in a fresh process, docs/PERFORMANCE.md). Imported with the
# diffusers engine when ACESTEP_SPEEDUPS names `compile`, so a runner started ahead imports them
# while it waits for its job instead of after the job arrives. Importing them touches no GPU.
COMPILE_LOADER_MODULES = ("torch._dynamo", "torch._functorch.aot_autograd", "torch._inductor.codecache",
                          "torch._inductor.compile_fx", "torch._inductor.lowering", "torch._inductor.select_algorithm",
                          "torch._inductor.kernel.mm", "torch._inductor.codegen.wrapper",
                          "torch._inductor.codegen.memory_planning", "torch._inductor.hooks",
                          "torch._inductor.runtime.triton_heuristics", "torch.fx.experimental.validator")


def _compile_chosen() -> bool:
    try:
        return "compile" in (speedup_names(os.environ.get("ACESTEP_SPEEDUPS", "")) or ())
    except ValueError:  # the job will refuse it (bad_speedups) with the full sentence
        return False


def modules_to_import(name: str | None) -> tuple[str, ...]:
    """torch, then the stack of engine `name` (none for an unknown name), then the compiled blocks'
    loader where the diffusers engine will load them."""
    modules = ("torch", *ENGINE_MODULES.get(name, ()))
    if name == "diffusers" and _compile_chosen():
        modules += COMPILE_LOADER_MODULES
    return modules


def create(name: str) -> Engine:
    """Import only the engine asked for."""
    if name == "diffusers":
        from runner.engines.diffusers_engine import DiffusersEngine

        return DiffusersEngine()
    if name == "acestep":
        from runner.engines.acestep_engine import AcestepEngine

        return AcestepEngine()
    raise checkpoint_error("unknown_engine", f"Unknown engine {name!r}; ACESTEP_ENGINE must be one of {', '.join(ENGINE_NAMES)}.")


def import_seconds(name: str | None = None) -> float:
    """Import `modules_to_import(name)` (default: ACESTEP_ENGINE, else torch alone); the seconds it
    took, 0 where this process already has them. Importing touches no GPU."""
    name = name or os.environ.get("ACESTEP_ENGINE") or None
    wanted = modules_to_import(name)
    if all(module in sys.modules for module in wanted):
        return 0.0
    started = time.perf_counter()
    for module in wanted:
        importlib.import_module(module)
    return round(time.perf_counter() - started, 3)
