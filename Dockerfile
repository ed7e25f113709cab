# The T4 production image of the ACE-Step 1.5 lego stem service.
#
#   docker build -t acestep-stem-service .
#   docker run --gpus all -p 8002:8002 -v acestep-checkpoints:/app/checkpoints acestep-stem-service
#
# docs/DEPLOY.md has the whole story: weights download, compose with the gpu-queue-service,
# checking that the idle service holds no VRAM, and a troubleshooting list by error_code.
#
# Base image and CUDA, and why they suit a T4 (sm_75):
# - The official ACE-Step 1.5 pins torch==2.10.0+cu128 on Linux x86_64 (its pyproject.toml and
#   uv.lock at the commit below). PyPI's torch 2.10.0 Linux x86_64 wheel is that same CUDA 12.8
#   build: it reports torch.version.cuda == "12.8" and depends on the nvidia-*-cu12 12.8 wheels.
# - Its compiled architectures (torch._C._cuda_getArchFlags(), checked on the PyPI wheel):
#   sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120. sm_75 is the T4. PyTorch's build script
#   (.ci/manywheel/build_cuda.sh) and its CUDA support matrix (pytorch/pytorch#172352) agree:
#   the 12.6, 12.8 and 13.0 builds all keep Turing 7.5; CUDA 13.0 dropped only Maxwell, Pascal and
#   Volta (the PyPI torch 2.11.0+cu130 wheel reports sm_75 ... sm_120 too). cu128 is chosen
#   because it is what ACE-Step pins and because it needs an older host driver than CUDA 13.
# - The base is the CUDA 12.8 runtime's "base" flavour: cudart plus the NVIDIA container
#   settings (NVIDIA_VISIBLE_DEVICES, NVIDIA_REQUIRE_CUDA=cuda>=12.8). The torch wheels bring
#   their own cuBLAS/cuDNN/NCCL as pip packages, so the larger "runtime"/"cudnn-runtime"
#   flavours would only ship a second copy (several GB).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# builder: a virtual environment with torch, the official ACE-Step 1.5 and what it needs.
# Nothing here depends on this project's code (only on its package list), so the layers stay
# cached across code changes.
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS builder

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# Ubuntu 24.04's python3 is 3.12, inside ACE-Step's requires-python (>=3.11,<3.13).
# git is needed only here, for pip's git checkout of ACE-Step; it never reaches the final image.
# DL3008 (apt versions) is ignored: Ubuntu's archive keeps only the newest build of a package per
# release, so a pinned apt version stops building once it moves on; the base image tag pins the
# release and its security updates are wanted.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# The image's Python packages: one list, image/requirements.txt (torch 2.10.0 and what ACE-Step
# needs to run lego, with the reasons for each pin). `make image-env` installs the same list into a
# venv on a machine without Docker, where `make official-check` tests it. Only that file is copied
# here, so code changes do not redo this layer.
COPY image/requirements.txt /tmp/image-requirements.txt
RUN pip install --no-cache-dir -r /tmp/image-requirements.txt

# The official ACE-Step 1.5 (github.com/ace-step/ACE-Step-1.5), installed from git at a pinned
# commit: 6d467e4b5081ccb0abf1ec1bf4fdf9051a2d34b0, official `main` of 2026-06-26 ("test(api):
# update auto-label alias expectation"), the newest official main that could be found (the
# ace-step/ACE-Step-1.5 copies reachable while this was written stop at 2026-02-08; mirrors of its
# main, such as arkhaminferno/ACE-Step-1.5, carry it). How it was checked: a checkout whose files
# are byte-identical to that commit's tree passed `make official-check` (docs/DEPLOY.md): every
# module the runner imports, two jobs through `python -m runner serve` on a tiny checkpoint built
# from its own model classes, SIGTERM during load and diffusion. Run it again before moving the pin.
# Not from PyPI: there ACE-Step 1.5 exists only as `ace-step15-fork` (20260212), an
# unofficial February-2026 snapshot of a single-file handler, and the `ace-step` name holds
# ACE-Step 1.0. --no-deps because its dependency list names nano-vllm as a local path of the
# repository (and the UI/training stacks left out of image/requirements.txt); the dependencies
# it needs for inference are installed by the previous layer. The freeze becomes the constraints
# file that keeps the web layer's dependencies from moving any of these versions.
ARG ACESTEP_REPO=https://github.com/ace-step/ACE-Step-1.5.git
ARG ACESTEP_COMMIT=6d467e4b5081ccb0abf1ec1bf4fdf9051a2d34b0
# DL3013 wants `==`; a git URL pinned to a full commit hash is pinned at least as tightly.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps "ace-step @ git+${ACESTEP_REPO}@${ACESTEP_COMMIT}" \
    && pip freeze --exclude ace-step > /opt/venv/acestep-constraints.txt

# ---------------------------------------------------------------------------------------------
# final image: the environment above, ffmpeg and libsndfile, this project, a non-root user.
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}

ARG ACESTEP_COMMIT=6d467e4b5081ccb0abf1ec1bf4fdf9051a2d34b0
LABEL org.opencontainers.image.title="acestep-stem-service" \
      org.opencontainers.image.description="Vocals, backing vocals or drums stems that fit a source stem, with ACE-Step 1.5's lego task (T4 image)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      acestep.commit="${ACESTEP_COMMIT}"

# ffmpeg: ffprobe for the web layer, and the FFmpeg libraries torchcodec decodes with.
# DL3008 is ignored for the reason given in the builder stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ffmpeg libsndfile1 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 acestep \
    && useradd --system --uid 10001 --gid acestep --create-home --home-dir /home/acestep \
        --shell /usr/sbin/nologin acestep \
    && mkdir -p /app/checkpoints /app/data \
    && chown acestep:acestep /app/checkpoints /app/data

COPY --from=builder /opt/venv /opt/venv

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The web layer's dependencies (setup.cfg install_requires, read by image/web_requirements.py as
# `make image-env` reads them, and the `rq` extra, which the multi-host mode's web tier and
# `python -m webapp.worker` use; never the `runner` extra: its diffusers 0.42.1 / transformers 5
# stack conflicts with ACE-Step's transformers<4.58), held to the versions of the ACE-Step
# environment by the constraints file written in the builder. Only these files are copied first,
# so code changes do not redo this layer.
COPY setup.cfg pyproject.toml ./
COPY image/web_requirements.py image/
RUN python image/web_requirements.py setup.cfg rq > /tmp/web-requirements.txt \
    && pip install --no-cache-dir -c /opt/venv/acestep-constraints.txt -r /tmp/web-requirements.txt

# The source last (.dockerignore lets in only what the service runs), installed without
# dependencies so `python -m runner` works from any working directory. Then import every module
# the runner imports for this image's engine (runner/imports.py, the same check `make
# official-check` runs): a package missing from image/requirements.txt fails the build, not the
# first job. Importing touches no GPU, so none is needed to build.
COPY . .
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && python -m runner.imports acestep

# Settings (the README's configuration table has them all). The recommended T4 settings, from
# the measurements in docs/PERFORMANCE.md: dtype auto, which on a T4 (sm_75, no native bfloat16)
# is float16 with one float32 retry when the output comes out NaN or silent; offload on (the text
# encoder and VAE leave the GPU between uses), which kept a 240 s source at 6,669 MiB in float16
# (guidance on) and 11,117 MiB in float32 (240 s, guidance on); no keep-warm, so the service holds no VRAM while idle. No language model, ever. ACESTEP_CONFIG_PATH is the seed's DiT folder name.
# ACE-Step's own ACESTEP_CHECKPOINTS_DIR / ACESTEP_PROJECT_ROOT are deliberately left unset: the
# runner hands ACE-Step a private view of the checkpoint folder (so it never downloads the parts
# lego does not use), and those variables would point it back at the real folder.
ENV PORT=8002 \
    ACESTEP_CHECKPOINTS=/app/checkpoints \
    DATA_DIR=/app/data \
    ACESTEP_ENGINE=acestep \
    ACESTEP_DEVICE=cuda \
    ACESTEP_DTYPE=auto \
    ACESTEP_OFFLOAD=on \
    KEEP_WARM_S=0 \
    ACESTEP_INIT_LLM=false \
    ACESTEP_CONFIG_PATH=acestep-v15-base \
    HOME=/home/acestep

USER 10001:10001

VOLUME ["/app/checkpoints", "/app/data"]
EXPOSE 8002

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8002'), timeout=4)"]

# The web service. A GPU host of the multi-host mode runs `python -m webapp.worker` instead
# (docker-compose.example.yml, profile scale-out).
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
