#!/usr/bin/env bash
# One device call: facts about the machine, then the NVML-after-fork probe.
cd "$(dirname "$0")"
nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader
python3 -V; python3 -c "import torch; print('torch', torch.__version__)"
python3 -c "import pynvml, sys; print('pynvml at', pynvml.__file__)" 2>&1 | tail -1
python3 -c "import pynvml" 2>/dev/null || { python3 -m pip install -q --no-index --no-deps --target /tmp/probe-site nvidia_ml_py-*.whl; export PYTHONPATH=/tmp/probe-site; }
OUT=${OUT:-/tmp} timeout 300 python3 nvml_fork_probe.py
