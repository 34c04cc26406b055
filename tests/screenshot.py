"""``python -m tests.screenshot PATH``: the README's picture of the dashboard (``make screenshot``).

A stand-in launcher with a few instances and a model profile, opened in the same browser the
dashboard tests use, captured with their :func:`tests.browser.screenshot` helper.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import expect

from tests.browser import browser, screenshot
from tests.launcher_process import LauncherProcess, free_port, wait_until


def main(target: str) -> int:
    """Write the screenshot to ``target``."""
    folder = Path(tempfile.mkdtemp(prefix="screenshot-"))
    models = folder / "models.yaml"
    models.write_text(json.dumps({"idle_timeout": 300, "models": {
        "llama-3-8b": {"options": "--model /models/llama-3-8b", "aliases": ["llama"]},
        "qwen-7b": {"options": "--model /models/qwen-7b"}}}))  # fmt: skip
    env = {"LAUNCHER_MOCK_GPUS": "1", "LAUNCHER_MOCK_GPU_COUNT": "4", "LAUNCHER_MODELS_FILE": str(models)}
    launcher = LauncherProcess(workload="standin", env=env)
    try:
        for number, (name, gpu, delay) in enumerate([("opt-125m", "GPU-0", 0.4), ("mistral-7b", "GPU-1", 1.1),
                                                     ("phi-3", "GPU-2", 0.7)]):  # fmt: skip
            options = f"--model /models/{name} --port {free_port()} --host 127.0.0.1 --startup-delay {delay}"
            launcher.create(f"{name}-{number}", options=options, gpu_uuids=[gpu])
        launcher.client.post("/v2/vllm/models/llama-3-8b/start")
        wait_until(lambda: all(item["ready"] for item in launcher.client.get("/v2/vllm/instances").json()["instances"]),
                   30, what="every instance ready")  # fmt: skip
        with browser() as chromium:
            page = chromium.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{launcher.base_url}/ui")
            expect(page.locator("#chart rect")).not_to_have_count(0)
            expect(page.locator("#gpus li")).to_have_count(4)
            launcher.create("starting-now", options=f"--model /models/gemma --port {free_port()} --startup-delay 30")
            expect(page.locator('#instances tr[data-id="starting-now"]')).to_contain_text("starting")
            expect(page.locator("#gpus li").first).to_contain_text("opt-125m-0")
            print(screenshot(page, Path(target)))
    finally:
        launcher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png"))
