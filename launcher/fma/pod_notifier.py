"""``python -m launcher.fma.pod_notifier``: publish the launcher's instance signature on its pod.

The contract of llm-d FMA's ``launcher_pod_notifier.py`` sidecar: the pod annotation
``dual-pods.llm-d.ai/vllm-instance-signature`` holds the SHA-256 (hex) of the sorted
``(instance_id, status)`` pairs, JSON-encoded without spaces; the dual-pods controller is woken
by the pod update and re-reads the launcher. The same state gives the same signature as
upstream's. Where upstream polls ``GET /v2/vllm/instances`` every 2 s, this follows the
launcher's watch stream, so a change reaches the pod in milliseconds; it lists again (and
republishes if needed) after any error, so nothing is missed.

Environment (as upstream): ``POD_NAME``, ``NAMESPACE`` (required), ``LAUNCHER_BASE_URL``
(default ``http://127.0.0.1:8001``), plus ``LAUNCHER_API_TOKEN`` when the launcher has one.
Kubernetes: the in-cluster configuration, else the kubeconfig (``$KUBECONFIG``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from launcher.client.api_client import GoneError, LauncherClient

ANNOTATION = "dual-pods.llm-d.ai/vllm-instance-signature"
DEFAULT_BASE_URL = "http://127.0.0.1:8001"
RETRY_SECONDS = 1.0

log = logging.getLogger("launcher.fma.pod_notifier")


def signature(pairs: Iterable[tuple[str, str]]) -> str:
    """Upstream's signature of a launcher state: sha256 of the sorted (id, status) pairs as JSON."""
    blob = json.dumps(sorted(pairs), separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


class _Publisher:
    """Publishes a state's signature when it differs from the last one published."""

    def __init__(self, publish: Callable[[str], None]) -> None:
        self._publish = publish
        self.last: str | None = None

    def offer(self, states: dict[str, str]) -> None:
        current = signature(states.items())
        if current != self.last:
            self._publish(current)  # raises on failure: then it is offered again after a relist
            self.last = current
            log.info("published signature %s (%d instances)", current[:12], len(states))


def follow(client: LauncherClient, publish: Callable[[str], None], stop: threading.Event | None = None) -> None:
    """List, publish, then follow the watch stream, publishing each change; until ``stop`` is set."""
    stop = stop or threading.Event()
    publisher = _Publisher(publish)
    while not stop.is_set():
        try:
            listing = client.list(detail=True)
            states = {item["instance_id"]: item["status"] for item in listing["instances"]}
            publisher.offer(states)
            with client.watch(since=int(listing["revision"])) as events:
                for event in events:
                    if stop.is_set() or event["type"] == "ERROR":
                        break  # the watcher fell behind: list again
                    state: dict[str, Any] = dict(event["object"])
                    if event["type"] == "DELETED":
                        states.pop(state["instance_id"], None)
                    else:
                        states[state["instance_id"]] = state["status"]
                    publisher.offer(states)
        except GoneError:
            continue  # the revision left the launcher's window: list again at once
        except Exception as exc:  # noqa: BLE001 - the sidecar must outlive any failure
            log.warning("notifier: %s; retrying in %.0fs", exc, RETRY_SECONDS)
        stop.wait(RETRY_SECONDS)


def kubernetes_api() -> Any:
    """A ``CoreV1Api``: the in-cluster configuration, else the kubeconfig (``$KUBECONFIG``)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.CoreV1Api()


def pod_patcher(namespace: str, pod: str) -> Callable[[str], None]:
    """A function that writes the signature annotation on ``pod`` (a strategic-merge patch)."""
    api = kubernetes_api()

    def publish(value: str) -> None:
        body = {"metadata": {"annotations": {ANNOTATION: value}}}
        api.patch_namespaced_pod(name=pod, namespace=namespace, body=body)

    return publish


def main(argv: list[str] | None = None) -> int:
    """Run the notifier until killed; 1 if its environment is incomplete."""
    parser = argparse.ArgumentParser(prog="python -m launcher.fma.pod_notifier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pod, namespace = os.environ.get("POD_NAME"), os.environ.get("NAMESPACE")
    if not pod or not namespace:
        log.error("POD_NAME and NAMESPACE must be set (from the pod's fieldRefs)")
        return 1
    base_url = os.environ.get("LAUNCHER_BASE_URL", DEFAULT_BASE_URL).rstrip("/")
    try:
        publish = pod_patcher(namespace, pod)
    except Exception as exc:  # noqa: BLE001 - say why in one line
        log.error("cannot configure the Kubernetes client: %s", exc)
        return 1
    log.info("following %s for pod %s/%s", base_url, namespace, pod)
    with LauncherClient(base_url, token=os.environ.get("LAUNCHER_API_TOKEN") or None) as client:
        try:
            follow(client, publish)
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
