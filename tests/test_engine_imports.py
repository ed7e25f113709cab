"""The runner imports only what its engine needs, and the image's one package list provides it.

Issue found on the official code: the runner imported diffusers' AceStepPipeline at start whatever
the engine (the image's diffusers 0.37.1 has none: every job failed), and `soxr` was missing from
the image while its build-time check imported only `acestep`.
"""
from __future__ import annotations

import configparser
import json
import re
import subprocess
import sys
from importlib import metadata

from conftest import PYTHON, REPO, runner_env
from runner.imports import check

REQUIREMENTS = REPO / "image" / "requirements.txt"
ACESTEP_ITSELF = {"acestep", "nanovllm"}  # the Dockerfile's git install; the never-loaded language model's stack

# diffusers 0.37.1 as the image has it: no AceStepPipeline, no ace_step pipeline package (the
# fork's handler still imports diffusers' VAE, as the official one does).
WITHOUT_DIFFUSERS_ACE_STEP = r'''
import sys, importlib.abc
class NoAceStepInDiffusers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("diffusers.pipelines.ace_step"):
            raise ModuleNotFoundError(f"No module named {name!r} (diffusers 0.37.1)")
        return None
sys.meta_path.insert(0, NoAceStepInDiffusers())
import diffusers
original = type(diffusers).__getattr__
def no_ace_step_pipeline(module, name):
    if name.startswith("AceStep") and name.endswith("Pipeline"):
        raise AttributeError(f"module 'diffusers' has no attribute {name!r} (diffusers 0.37.1)")
    return original(module, name)
type(diffusers).__getattr__ = no_ace_step_pipeline
from runner.cli import main
sys.exit(main(sys.argv[1:]))
'''


def names(requirement_lines) -> set[str]:
    found = set()
    for line in requirement_lines:
        line = line.split("#")[0].strip()
        if line:
            found.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return found


def image_packages() -> set[str]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    web = config["options"]["install_requires"].splitlines()
    return names(REQUIREMENTS.read_text().splitlines()) | names(web)


def with_dependencies(packages: set[str]) -> set[str]:
    """The packages and what they require (as installed here), transitively."""
    seen, pending = set(), list(packages)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        pending += [n for n in names(r for r in requires if "extra ==" not in r)]
    return seen


def test_every_module_the_runner_imports_for_acestep_comes_from_the_image_list():
    report = check("acestep")
    top_level = {m.split(".")[0] for m in report["imported"]} - {"runner", "patches"} - set(sys.stdlib_module_names)
    providers = metadata.packages_distributions()
    provided = with_dependencies(image_packages())
    missing = {}
    for module in sorted(top_level - ACESTEP_ITSELF):
        distributions = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
        if not distributions & provided:
            missing[module] = sorted(distributions)
    assert "soxr" in top_level and "soundfile" in top_level and "torch" in top_level
    assert not missing, f"modules the runner imports that image/requirements.txt does not bring: {missing}"


def test_a_list_without_a_runner_package_is_caught(monkeypatch, tmp_path):
    """The check above is not vacuous: drop loguru (the acestep handler imports it; only the image's
    list brings it) and it fails. soxr, the package this was found with, now also comes with the web
    layer's librosa (POST /analyze), in the same environment, so dropping it alone proves nothing."""
    stripped = tmp_path / "requirements.txt"
    stripped.write_text("\n".join(l for l in REQUIREMENTS.read_text().splitlines() if not l.startswith("loguru")))
    monkeypatch.setattr(sys.modules[__name__], "REQUIREMENTS", stripped)
    provided = with_dependencies(image_packages())
    assert "loguru" not in provided and "torch" in provided


def run_without_diffusers_ace_step(*args, **env):
    done = subprocess.run([PYTHON, "-c", WITHOUT_DIFFUSERS_ACE_STEP, *map(str, args)], input="", capture_output=True,
                          text=True, cwd=REPO, env=runner_env(**env), timeout=300)
    return done, [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_serve_for_the_acestep_engine_starts_without_diffusers_ace_step():
    done, events = run_without_diffusers_ace_step("serve", ACESTEP_ENGINE="acestep")
    assert done.returncode == 0, done.stderr[-2000:]
    assert events[0]["event"] == "ready" and events[0]["loaded"] is False and events[0]["import_s"] > 0


def test_an_acestep_job_reaches_its_engine_without_diffusers_ace_step(tmp_path, tone):
    """On the fork no weights load, so the job ends at the load (exit 3), past every import, and the
    patch outcomes are in the runner's log at INFO."""
    checkpoints = tmp_path / "ckpt"
    for part in ("acestep-v15-base", "vae", "Qwen3-Embedding-0.6B"):
        (checkpoints / part).mkdir(parents=True)
        for name in ("config.json", "tokenizer.json", "model.safetensors"):
            (checkpoints / part / name).write_text("{}")
    done, events = run_without_diffusers_ace_step("lego", "--source", tone(), "--track", "drums", "--bpm", "100",
                                                   "--checkpoints", checkpoints, "--engine", "acestep",
                                                   "--out", tmp_path)
    assert events[-1]["code"] == "checkpoint_unloadable", (events, done.stderr[-2000:])
    assert "[patches] INFO lego_source_context: applied" in done.stderr


def test_the_diffusers_engine_imports_nothing_of_acestep():
    code = ("import sys; from runner.engines import import_seconds; import_seconds('diffusers'); "
            "print(sorted(m for m in sys.modules if m == 'acestep' or m.startswith(('acestep.', 'nanovllm'))))")
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=REPO, env=runner_env(), timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


def test_the_compile_switch_imports_the_compiled_blocks_loader_with_the_engine():
    """With `compile` chosen, a runner started ahead imports Inductor's loader while it waits (3.3 s of
    a first job on the H200's host, docs/PERFORMANCE.md); without it, none of that is imported."""
    code = ("import sys; from runner.engines import import_seconds, COMPILE_LOADER_MODULES; import_seconds('diffusers'); "
            "print(sum(m in sys.modules for m in COMPILE_LOADER_MODULES), len(COMPILE_LOADER_MODULES))")
    counts = {}
    for speedups in ("contiguous,fused,attention,compile", "default", "not-a-switch"):
        done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                              env=runner_env(ACESTEP_SPEEDUPS=speedups))
        assert done.returncode == 0, done.stderr[-2000:]
        counts[speedups] = tuple(map(int, done.stdout.split()))
    imported, listed = counts["contiguous,fused,attention,compile"]
    assert imported == listed > 0
    assert counts["default"][0] < listed and counts["not-a-switch"] == counts["default"]
