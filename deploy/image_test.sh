#!/usr/bin/env bash
# `make image-test`: build the CPU image with podman and smoke-test it on this machine.
#
# Three runs of the image, each with the tiny model mounted at /models/tiny: create an instance
# through the API (vLLM's default mode: the model is compiled, so the C++ compiler and a writable
# HOME are exercised), wait until it is healthy, get a completion, delete it, stop the container
# and check it stopped cleanly.
#   1. as the image runs by default (uid 1000, `python3 -m launcher`);
#   2. as OpenShift runs it: an arbitrary UID in group 0 (`--user 1000770000:0`), no passwd entry;
#      there a model whose weights that UID cannot read is refused with "permission denied";
#   3. as llm-d FMA runs it: `python3 /app/launcher.py` with PYTHONPATH=/app; nothing in /app may
#      shadow a module the forkserver or vLLM imports.
# One line per step, with its time. Containers it started are removed on the way out.
#
# Variables: IMAGE (default localhost/vllm-launcher:cpu-test); CPU_BASE (the base to build on;
# default python:3.11-slim if a registry gives it, else a local stand-in built with debootstrap);
# LOCAL_BASE=1 (use the local stand-in even where a registry answers); TINY_MODEL (default .tiny-model);
# PY (the Python that builds the tiny model, default .venv/bin/python).
set -euo pipefail

SCRIPT=$(readlink -f "$0")
cd "$(dirname "$SCRIPT")/.."
IMAGE=${IMAGE:-localhost/vllm-launcher:cpu-test}
LOCAL_BASE_IMAGE=localhost/python-slim-local:3.11
REGISTRY_BASE=docker.io/library/python:3.11-slim
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TINY_MODEL=${TINY_MODEL:-.tiny-model}
PY=${PY:-.venv/bin/python}
ARBITRARY_USER=1000770000:0
# vLLM here as in the tests (tests/launcher_process.py): no model hub, no thread pinning.
OPTIONS="--model /models/tiny --port 8100 --max-model-len 256 --kv-cache-memory-bytes 32M"
PRIVATE_OPTIONS="--model /models/private --port 8101 --max-model-len 256 --kv-cache-memory-bytes 32M"
RUN_ENV=(-e HF_HUB_OFFLINE=1 -e VLLM_CPU_OMP_THREADS_BIND=nobind)

# crun refuses a hybrid cgroup layout ("cgroups in hybrid mode not supported"): where the cgroup v2
# tree is also mounted at /sys/fs/cgroup/unified, run everything in a private mount namespace
# without it. One namespace for the whole script: its containers' mounts live there.
if [ -z "${IMAGE_TEST_UNSHARED:-}" ] && mountpoint -q /sys/fs/cgroup/unified 2>/dev/null; then
    exec env IMAGE_TEST_UNSHARED=1 unshare -m --propagation private bash "$SCRIPT" "$@"
fi
if [ -n "${IMAGE_TEST_UNSHARED:-}" ]; then umount /sys/fs/cgroup/unified; fi
# This machine's default limits are too low for podman's builds and vLLM's threads.
LIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=32768:32768)

command -v podman >/dev/null || { echo "image-test needs podman (apt-get install -y podman debootstrap)" >&2; exit 1; }

STARTED=$(date +%s.%N)
STEP_STARTED=$STARTED
CONTAINERS=()
CURRENT=""
SCRATCH=$(mktemp -d)

cleanup() {
    for name in "${CONTAINERS[@]}"; do podman rm -f -t 0 "$name" >/dev/null 2>&1 || true; done
    rm -rf "$SCRATCH"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%6.1f", b - a }'; }

# One line per step: its own time, then the time since the start.
step() {
    echo "image-test: $(elapsed "$STEP_STARTED") s  (at $(elapsed "$STARTED") s)  $*"
    STEP_STARTED=$(date +%s.%N)
}

fail() {
    echo "image-test: FAILED: $*" >&2
    if [ -n "$CURRENT" ]; then
        echo "--- the last lines of $CURRENT's log:" >&2
        podman logs "$CURRENT" 2>&1 | tail -40 >&2
    fi
    exit 1
}

# http METHOD URL [JSON]: prints the status code; the body is in $SCRATCH/body.
http() {
    local data=()
    if [ $# -ge 3 ]; then data=(-H 'Content-Type: application/json' --data "$3"); fi
    curl -sS -o "$SCRATCH/body" -w '%{http_code}' -X "$1" "${data[@]}" --max-time 120 "$2" 2>/dev/null || echo 000
}

# wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds; fails after SECONDS.
wait_for() {
    local deadline=$(($(date +%s) + $1)) what=$2
    shift 2
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || fail "timed out waiting for $what"
        [ -z "$CURRENT" ] || [ "$(podman inspect -f '{{.State.Running}}' "$CURRENT")" = true ] \
            || fail "$CURRENT exited while waiting for $what"
        sleep 0.5
    done
}

# expect CODE WANTED PATTERN WHAT: the answer was WANTED and its body has PATTERN.
expect() {
    if [ "$1" != "$2" ] || ! grep -q -- "$3" "$SCRATCH/body"; then fail "$4 answered $1: $(cat "$SCRATCH/body")"; fi
}

is_200() { [ "$(http GET "$1")" = 200 ]; }
ready() { is_200 "$1" && grep -q '"ready": *true' "$SCRATCH/body"; }

# --------------------------------------------------------------------------- the base and the image

# debootstrap's Debian with a venv at /usr/local, so python3 and pip resolve as in python:3.11-slim
# (libpython3.11-dev: its headers, which torch inductor compiles against). Built once, kept.
build_local_base() {
    if podman image exists "$LOCAL_BASE_IMAGE"; then return; fi
    command -v debootstrap >/dev/null || fail "the local base needs debootstrap (apt-get install -y debootstrap)"
    local root="$SCRATCH/rootfs"
    debootstrap --variant=minbase --include=python3-venv,libpython3.11-dev,ca-certificates \
        bookworm "$root" "$DEBIAN_MIRROR" >"$SCRATCH/debootstrap.log" 2>&1 \
        || { tail -20 "$SCRATCH/debootstrap.log" >&2; fail "debootstrap"; }
    chroot "$root" /usr/bin/python3 -m venv /usr/local
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | podman import -q --change 'ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' - "$LOCAL_BASE_IMAGE" >/dev/null
    rm -rf "$root"
}

choose_base() {
    if [ -n "${CPU_BASE:-}" ]; then return; fi
    if [ -z "${LOCAL_BASE:-}" ] && { podman image exists "$REGISTRY_BASE" \
        || timeout 60 podman pull -q "$REGISTRY_BASE" >/dev/null 2>&1; }; then
        CPU_BASE=$REGISTRY_BASE
    else
        build_local_base
        CPU_BASE=$LOCAL_BASE_IMAGE
    fi
}

# pip in the build reads this machine's configuration (local wheel folders, indexes, CA bundle):
# each configuration file, and every absolute path it names, read-only at the same place
# (an index's `.../simple` with the folder above it, where its pages link to the files).
pip_mounts() {
    local configs=() paths=() path named
    for path in /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf" \
        ${PIP_CONFIG_FILE:-}; do
        if [ -f "$path" ]; then configs+=("$path"); fi
    done
    for path in "${configs[@]}"; do
        case "$path" in
            "$HOME"/*) echo "-v $path:/root/${path#"$HOME"/}:ro" ;; # the build runs as root
            *) paths+=("$path") ;;
        esac
        while read -r named; do
            named=${named#file://}
            named=${named%/}
            case "$named" in */simple) named=$(dirname "$named") ;; esac
            if [ -e "$named" ]; then paths+=("$named"); fi
        done < <(grep -oE '(file://)?/[^[:space:],]+' "$path" || true)
    done
    printf '%s\n' "${paths[@]}" | sort -u | while read -r path; do echo "-v $path:$path:ro"; done
}

choose_base
step "base: $CPU_BASE"

# shellcheck disable=SC2207 # one mount per line, no spaces in them
MOUNTS=($(pip_mounts))
podman build "${LIMITS[@]}" "${MOUNTS[@]}" --build-arg VARIANT=cpu --build-arg CPU_BASE="$CPU_BASE" \
    -t "$IMAGE" . >"$SCRATCH/build.log" 2>&1 || { tail -30 "$SCRATCH/build.log" >&2; fail "podman build"; }
step "built $IMAGE ($(podman image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%.1f GB", $1 / 1e9 }'))"

if [ ! -f "$TINY_MODEL/.complete" ]; then "$PY" -m tests.tiny_model "$TINY_MODEL" >/dev/null; fi
MODEL=$(cd "$TINY_MODEL" && pwd)
# The same model with weights only root may read (mode 0600, as safetensors writes them).
PRIVATE="$SCRATCH/private-model"
cp -r "$MODEL" "$PRIVATE"
chmod 755 "$SCRATCH" "$PRIVATE"
chmod 600 "$PRIVATE/model.safetensors"
step "tiny model: $MODEL"

# --------------------------------------------------------------------------- a run of the image

# The instance's start time, and the compile's share of it, from its state in the last answer.
start_summary() {
    python3 - "$SCRATCH/body" <<'EOF'
import json, sys
state = json.load(open(sys.argv[1]))
print(f"start {state['start_seconds']:.1f} s, {state['start_phases']['compile']:.1f} s of it compiling")
EOF
}

# A TCP port nothing on this machine listens on.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# smoke NAME PODMAN-RUN-ARGUMENTS...: run the image (and command) they name; create an instance,
# use it, delete it, stop the container.
smoke() {
    local name=$1 api instance
    shift
    api=$(free_port)
    instance=$(free_port)
    CURRENT="image-test-$name-$$"
    CONTAINERS+=("$CURRENT")
    podman run -d --name "$CURRENT" "${LIMITS[@]}" --shm-size 1g "${RUN_ENV[@]}" \
        -p "127.0.0.1:$api:8001" -p "127.0.0.1:$instance:8100" \
        -v "$MODEL:/models/tiny:ro" -v "$PRIVATE:/models/private:ro" "$@" >/dev/null
    local base="http://127.0.0.1:$api"
    wait_for 300 "the launcher's /health" is_200 "$base/health"
    step "$name: the launcher answers /health ($(podman logs "$CURRENT" 2>&1 | grep -o 'preloaded in [0-9.]* s' | head -1))"

    expect "$(http PUT "$base/v2/vllm/instances/smoke" "{\"options\": \"$OPTIONS\"}")" 201 smoke PUT
    wait_for 300 "the instance's /health" is_200 "http://127.0.0.1:$instance/health"
    wait_for 30 "the instance ready" ready "$base/v2/vllm/instances/smoke"
    step "$name: instance created and healthy: $(start_summary)"

    expect "$(http POST "http://127.0.0.1:$instance/v1/completions" \
        '{"model": "/models/tiny", "prompt": "Hello there", "max_tokens": 8, "temperature": 0}')" 200 '"choices"' \
        "the completion"
    expect "$(http GET "$base/v2/vllm/instances")" 200 '"smoke"' "the list"
    step "$name: a completion, and the instance listed"

    if [ "$name" = arbitrary-uid ]; then
        expect "$(http PUT "$base/v2/vllm/instances/private" "{\"options\": \"$PRIVATE_OPTIONS\"}")" 400 \
            'permission denied: /models/private/model.safetensors' "a model it cannot read"
        step "$name: unreadable weights refused: $(sed 's/.*permission denied/permission denied/; s/".*//' "$SCRATCH/body")"
    fi
    if [ "$name" = fma ]; then
        # What FMA's controller gives every process of the pod: PYTHONPATH=/app (as podman exec does here).
        podman exec "$CURRENT" python3 -c '
import importlib, sys
from forkserver import vllm_entrypoints
for module in vllm_entrypoints.default_preload("cpu") + ["forkserver.__main__", "forkserver.vllm_workload"]:
    importlib.import_module(module)
found = sorted(name for name, module in sys.modules.items() if (getattr(module, "__file__", None) or "").startswith("/app/"))
sys.exit(f"imported from /app: {found}" if found else 0)' 2>"$SCRATCH/exec.err" \
            || fail "a module under /app shadows one the forkserver imports: $(tail -3 "$SCRATCH/exec.err")"
        step "$name: nothing under /app shadows what the forkserver and vLLM import"
    fi

    expect "$(http DELETE "$base/v2/vllm/instances/smoke")" 200 terminated "the DELETE"
    step "$name: instance deleted"

    podman stop -t 60 "$CURRENT" >/dev/null
    local exit_code
    exit_code=$(podman inspect -f '{{.State.ExitCode}}' "$CURRENT")
    podman logs "$CURRENT" >"$SCRATCH/$name.log" 2>&1
    [ "$exit_code" = 0 ] || fail "the container exited with $exit_code"
    grep -q "Application shutdown complete" "$SCRATCH/$name.log" || fail "no clean shutdown in the log"
    ! grep -E "Traceback|Permission denied|forkserver failed|torch cannot probe" "$SCRATCH/$name.log" \
        || fail "errors in the log"
    step "$name: stopped cleanly (exit 0, shutdown complete, no traceback)"
    podman rm "$CURRENT" >/dev/null
    CURRENT=""
}

smoke default "$IMAGE"
# --passwd=false: podman would add a passwd entry for the UID; OpenShift does not.
smoke arbitrary-uid --user "$ARBITRARY_USER" --passwd=false "$IMAGE"
smoke fma -e PYTHONPATH=/app --entrypoint python3 "$IMAGE" /app/launcher.py --host 0.0.0.0 --port 8001
step "passed"
