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
# Nothing here depends on this project's source, so the layers stay cached across code changes.
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

# torch, torchaudio, torchvision: ACE-Step's Linux x86_64 pins (see the top of this file).
ARG TORCH_VERSION=2.10.0
ARG TORCHVISION_VERSION=0.25.0
RUN pip install --no-cache-dir \
        "torch==${TORCH_VERSION}" \
        "torchaudio==${TORCH_VERSION}" \
        "torchvision==${TORCHVISION_VERSION}"

# What the acestep package needs to run the DiT, the VAE and the text encoder, with the versions
# of ACE-Step's own uv.lock where it fixes them (transformers 4.57.6 keeps its <4.58 bound;
# torchao 0.16 and torchcodec 0.10 are the releases built against torch 2.10). Left out on
# purpose: nano-vllm and flash-attn (the 5Hz language model, which this service never loads,
# and flash-attn needs Ampere or newer anyway), gradio/fastapi/uvicorn (ACE-Step's own UI and
# API server), lightning/tensorboard (training), modelscope (a download fallback; weights come
# through huggingface_hub, see `python -m runner download`). The torch pins are repeated so pip
# can never swap the build installed above. A RUN of its own, apart from torch's (DL3059):
# changing one of these pins must not download torch's few GB again.
# hadolint ignore=DL3059
RUN pip install --no-cache-dir \
        "torch==${TORCH_VERSION}" \
        "torchaudio==${TORCH_VERSION}" \
        "torchvision==${TORCHVISION_VERSION}" \
        "transformers==4.57.6" \
        "diffusers==0.37.1" \
        "accelerate==1.12.0" \
        "safetensors==0.7.0" \
        "torchao==0.16.0" \
        "torchcodec==0.10.0" \
        "vector-quantize-pytorch==1.27.20" \
        "einops==0.8.2" \
        "loguru>=0.7.3" \
        "soundfile>=0.13.1" \
        "scipy>=1.10.1" \
        "numba>=0.63.1" \
        "matplotlib>=3.7.5" \
        "peft>=0.18.0" \
        "lycoris-lora>=3.0" \
        "toml>=0.10" \
        "diskcache>=5.6" \
        "typer-slim>=0.21.1" \
        "pytorch-wavelets>=1.3.0" \
        "pywavelets>=1.9.0"

# The official ACE-Step 1.5 (github.com/ace-step/ACE-Step-1.5), installed from git at a pinned
# commit. Not from PyPI: there ACE-Step 1.5 exists only as `ace-step15-fork` (20260212), an
# unofficial February-2026 snapshot of a single-file handler, and the `ace-step` name holds
# ACE-Step 1.0. --no-deps because its dependency list names nano-vllm as a local path of the
# repository (and the UI/training stacks left out above); the dependencies it needs for
# inference are installed by the previous layer. The freeze becomes the constraints file that
# keeps the web layer's dependencies from moving any of these versions.
ARG ACESTEP_REPO=https://github.com/ace-step/ACE-Step-1.5.git
ARG ACESTEP_COMMIT=0333298c2a1d793d74798a69b5154e7877cbf5f4
# DL3013 wants `==`; a git URL pinned to a full commit hash is pinned at least as tightly.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps "ace-step @ git+${ACESTEP_REPO}@${ACESTEP_COMMIT}" \
    && pip freeze --exclude ace-step > /opt/venv/acestep-constraints.txt

# ---------------------------------------------------------------------------------------------
# final image: the environment above, ffmpeg and libsndfile, this project, a non-root user.
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}

ARG ACESTEP_COMMIT=0333298c2a1d793d74798a69b5154e7877cbf5f4
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

# Import ACE-Step's generation entry points here, where ffmpeg and libsndfile are present, so a
# module the pinned commit needs but the builder left out fails the build, not the first job.
# Importing does not touch CUDA, so no GPU is needed to build.
RUN python -c "import acestep.handler, acestep.inference"

WORKDIR /app

# The web layer's dependencies (setup.cfg install_requires, never the `runner` extra: its
# diffusers 0.42.1 / transformers 5 stack conflicts with ACE-Step's transformers<4.58), held to
# the versions of the ACE-Step environment by the constraints file written in the builder.
# Only setup.cfg is copied first, so code changes do not redo this layer.
COPY setup.cfg pyproject.toml ./
RUN python -c "import configparser, subprocess, sys; cfg = configparser.ConfigParser(); cfg.read('setup.cfg'); reqs = [r.strip() for r in cfg['options']['install_requires'].splitlines() if r.strip() and not r.strip().startswith('#')]; subprocess.check_call([sys.executable, '-m', 'pip', 'install', '--no-cache-dir', '-c', '/opt/venv/acestep-constraints.txt', *reqs])"

# The source last (.dockerignore lets in only what the service runs), installed without
# dependencies so `python -m runner` works from any working directory.
COPY . .
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info

# Settings (the README's configuration table has them all). The recommended T4 settings, from
# the measurements in docs/PERFORMANCE.md: dtype auto, which on a T4 (sm_75, no native bfloat16)
# is float16 with one float32 retry when the output comes out NaN or silent; offload on (the text
# encoder and VAE leave the GPU between uses), which kept a 240 s source under 6.7 GB in float16
# and 11.3 GB in float32; no keep-warm, so the service holds no VRAM while idle. No language model, ever. ACESTEP_CONFIG_PATH is the seed's DiT folder name.
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

CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
