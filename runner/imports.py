"""`python -m runner.imports ENGINE`: import every module the runner imports for ENGINE.

The image's build-time check and `make official-check` run it, so a package missing from the
image's list (image/requirements.txt) fails the build, not the first job. It starts from the
runner's entry points and the engine's stack, imports them, then reads the source of every runner
and patches module that got loaded and imports what their functions import too (a lazy
`import soxr` inside a function would otherwise only fail at run time). Modules that belong to
the other engine (they import its stack) are named and skipped: their commands cannot run in an
environment built for this engine. Optional imports the code itself guards are listed below.
"""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

from runner.contract import ENGINE_NAMES
from runner.engines import ENGINE_MODULES

ENTRY_POINTS = ("runner.cli", "runner.lego", "runner.serve", "runner.check", "runner.download")
OWN_PACKAGES = ("runner", "patches")
# Imported inside try blocks that report their absence: the language model's stack (never loaded).
OPTIONAL = ("nanovllm", "flash_attn")


def other_engine_marker(engine: str, module: str) -> bool:
    """Does `module` (an import target) belong to the other engine's stack?"""
    if engine == "acestep":
        return module.startswith("diffusers.pipelines.ace_step") or module.startswith("diffusers.models.transformers.ace_step")
    return module == "acestep" or module.startswith("acestep.")


def imports_in(path: Path, package: str) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every import statement in the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = importlib.util.resolve_name("." * node.level + base, package)
            found.append((base, [alias.name for alias in node.names]))
    return found


def _belongs_to_other(engine: str, imports: list[tuple[str, list[str]]]) -> bool:
    for module, names in imports:
        if other_engine_marker(engine, module):
            return True
        if engine == "acestep" and module == "diffusers" and any(n.startswith("AceStep") for n in names):
            return True
    return False


class ImportCheck:
    """The walk: `pending` holds (module, who imports it); own modules are read before they are imported."""

    def __init__(self, engine: str):
        self.engine = engine
        self.imported: list[str] = []
        self.skipped: dict[str, str] = {}
        self.optional: set[str] = set()
        self.scanned: set[str] = set()
        self.pending = [(name, "entry point") for name in (*ENTRY_POINTS, *ENGINE_MODULES[engine])]

    def run(self) -> dict:
        while self.pending:
            name, by = self.pending.pop(0)
            if name in self.imported or name in self.skipped or not name:
                continue
            if name.split(".")[0] in OPTIONAL:
                self.optional.add(name)
                continue
            if self._other_engines(name):
                self.skipped[name] = f"belongs to the other engine (imported by {by})"
                continue
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise ImportError(f"{name} (imported by {by}) does not import: {exc}") from exc
            self.imported.append(name)
            self._scan_loaded()
        return {"imported": self.imported, "skipped": self.skipped, "optional": sorted(self.optional)}

    def _other_engines(self, name: str) -> bool:
        if other_engine_marker(self.engine, name):
            return True
        if name.split(".")[0] not in OWN_PACKAGES:
            return False
        path = _source_of(name)
        return path is not None and _belongs_to_other(self.engine, imports_in(path, _package_of(name, path)))

    def _scan_loaded(self) -> None:
        for loaded in [m for m in list(sys.modules) if m.split(".")[0] in OWN_PACKAGES and m not in self.scanned]:
            self.scanned.add(loaded)
            path = _source_of(loaded)
            if path is None or self._other_engines(loaded):
                continue  # imported as a side effect (a package's __init__), never run for this engine
            for module, names in imports_in(path, _package_of(loaded, path)):
                self.pending.append((module, loaded))
                self.pending += [(f"{module}.{n}", loaded) for n in names if _is_submodule(module, n)]


def check(engine: str) -> dict:
    """Import everything; returns {"imported": [...], "skipped": {module: why}, "optional": [...]}."""
    return ImportCheck(engine).run()


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _source_of(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _is_submodule(module: str, name: str) -> bool:
    if not module or name == "*" or module.split(".")[0] in OPTIONAL:
        return False
    try:
        return importlib.util.find_spec(f"{module}.{name}") is not None
    except (ImportError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in ENGINE_NAMES:
        print(f"usage: python -m runner.imports {{{','.join(ENGINE_NAMES)}}}", file=sys.stderr)
        return 2
    report = check(args[0])
    third_party = sorted({m.split(".")[0] for m in report["imported"]} - {"runner", "patches"} - set(sys.stdlib_module_names))
    print(f"[imports] engine {args[0]}: {len(report['imported'])} modules import; third-party: {', '.join(third_party)}")
    for module, why in sorted(report["skipped"].items()):
        print(f"[imports] skipped {module}: {why}")
    if report["optional"]:
        print(f"[imports] optional, not required: {', '.join(report['optional'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
