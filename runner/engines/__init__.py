"""Engines: the code that turns a validated LegoJob into stems (DESIGN.md section 3)."""
from __future__ import annotations

from runner.engines.base import Engine
from runner.events import checkpoint_error

ENGINES = ("diffusers", "acestep")


def create(name: str) -> Engine:
    """Import only the engine asked for: each pulls in a heavy, different stack."""
    if name == "diffusers":
        from runner.engines.diffusers_engine import DiffusersEngine

        return DiffusersEngine()
    if name == "acestep":
        from runner.engines.acestep_engine import AcestepEngine

        return AcestepEngine()
    raise checkpoint_error("unknown_engine", f"Unknown engine {name!r}; ACESTEP_ENGINE must be one of {', '.join(ENGINES)}.")
