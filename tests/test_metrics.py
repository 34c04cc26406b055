"""Prometheus metrics after a create/delete cycle, on a real launcher (stand-in workload)."""

from __future__ import annotations

import re

from tests.launcher_process import LauncherProcess, free_port, wait_until


def _value(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name}{{{labels}}} not in metrics:\n{text}"
    return float(match.group(1))


def test_metrics_follow_a_create_delete_cycle() -> None:
    launcher = LauncherProcess(workload="standin")
    try:
        before = launcher.client.get("/metrics")
        assert before.status_code == 200
        assert before.headers["content-type"].startswith("text/plain")
        assert _value(before.text, "launcher_forkserver_up") == 1
        assert _value(before.text, "launcher_instance_creates_total") == 0

        assert launcher.create("m1", options=f"--model x --port {free_port()}").status_code == 201
        assert launcher.create("m2", options=f"--model x --port {free_port()} --crash-after 0.2").status_code == 201
        assert launcher.create("m1", options=f"--model x --port {free_port()}").status_code == 409
        assert launcher.create("bad", options="--model x --nope").status_code == 400
        wait_until(lambda: launcher.state("m1")["ready"], 10, what="m1 ready")
        wait_until(lambda: launcher.state("m2")["status"] == "stopped", 10, what="m2 stopped")
        assert len(launcher.client.get("/v2/vllm/instances/m1/log").content) > 0
        middle = launcher.client.get("/metrics").text
        assert _value(middle, "launcher_instance_creates_total") == 2
        assert _value(middle, "launcher_instance_create_failures_total", 'reason="conflict"') == 1
        assert _value(middle, "launcher_instance_create_failures_total", 'reason="invalid"') == 1
        assert _value(middle, "launcher_instances", 'ready="true",status="running"') == 1
        assert _value(middle, "launcher_instance_exits_total", 'how="error"') == 1
        assert _value(middle, "launcher_instance_start_seconds_count") >= 1
        assert _value(middle, "launcher_log_bytes_served_total") > 0

        assert launcher.client.delete("/v2/vllm/instances").status_code == 200
        after = launcher.client.get("/metrics").text
        assert _value(after, "launcher_instance_deletes_total") == 2
        assert _value(after, "launcher_instances", 'ready="true",status="running"') == 0
    finally:
        assert not launcher.stop()
