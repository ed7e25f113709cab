# The README's two commands: `make serve` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# ACE-Step 1.5 on PyPI (the Feb-2026 single-file fork) and the nano-vllm it vendors, without their
# dependency trees (vLLM, flash-attn, gradio...): the patches are tested against their real code;
# the Docker image installs the official repository.
ACESTEP_FORK := ace-step15-fork==20260212 nano-vllm-fork==20260210

.PHONY: serve test bench bench-demo install system-deps test-deps image-env official-check parity-check

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[runner,test]'
	$(PY) -m pip install -q --no-deps $(ACESTEP_FORK)
	touch $@

system-deps:
	scripts/system-deps.sh

# The tests also need Debian's chromium (the page's browser test) and redis-server (the RQ queue's).
test-deps:
	scripts/system-deps.sh --browser --redis

serve: install system-deps
	scripts/serve.sh

test: install test-deps
	$(PY) -m pytest

# The CPU part: the service's overhead around a stub runner (one host, then the RQ path), and the GPU benchmark's code path on
# the tiny checkpoint. The GPU figures come from benchmarks/gpu_bench.py on a GPU (docs/PERFORMANCE.md).
bench: install
	scripts/system-deps.sh --redis
	$(PY) benchmarks/service_overhead.py
	$(PY) benchmarks/rq_bench.py overhead --repeats 3
	$(PY) benchmarks/gpu_bench.py --work $${TMPDIR:-/tmp}/acestep-bench-cpu --size tiny --device cpu \
	    --durations 1,2 --steps 2 --groups float32:off:1 --parts memory,coldstart --cold-seconds 2 --short-seconds 1

# The demo model on a CPU: the real runner on the tiny checkpoint, 30 s and 120 s sources, 2 cores, seconds per
# minute of source per phase (docs/PERFORMANCE.md, "The demo model on a CPU"). A few minutes on 2 cores.
bench-demo: install
	$(PY) benchmarks/demo_speed.py

# The Docker image's Python environment (image/requirements.txt) in a venv, for a machine without
# Docker; IMAGE_ENV chooses where (default .image-env, ignored by git).
IMAGE_ENV ?= .image-env
image-env:
	IMAGE_ENV=$(IMAGE_ENV) scripts/image-env.sh

# The image's engine on an official ACE-Step 1.5 checkout (never copied here): imports, two jobs
# through `python -m runner serve` on a tiny ACE-Step-layout checkpoint built from the checkout's
# own classes, SIGTERM during load and diffusion. Run it before moving the Dockerfile's ACESTEP_COMMIT.
official-check: image-env
	@test -n "$(ACESTEP_SRC)" || { echo "usage: make official-check ACESTEP_SRC=/path/to/ACE-Step-1.5 [IMAGE_ENV=/path]"; exit 2; }
	PYTHONPATH=$(abspath $(ACESTEP_SRC)):$(CURDIR) $(IMAGE_ENV)/bin/python -m checks.official --acestep-src $(abspath $(ACESTEP_SRC))

# The same lego jobs through both engines, compared (float32: bit-identical): the acestep engine in
# the image's environment (IMAGE_ENV, as official-check), the diffusers engine in .venv, on a tiny
# checkpoint built from an official ACE-Step checkout's own classes (never copied here).
parity-check: install image-env
	@test -n "$(ACESTEP_SRC)" || { echo "usage: make parity-check ACESTEP_SRC=/path/to/ACE-Step-1.5 [IMAGE_ENV=/path]"; exit 2; }
	ACESTEP_SRC="$(abspath $(ACESTEP_SRC))" PARITY_ENV="$(IMAGE_ENV)" VENV="$(VENV)" scripts/parity/check.sh
