"""The dashboard (``/ui``) in a real browser: Debian's chromium driven by Playwright.

A real launcher with the stand-in workload (one test with the real vLLM tiny model). Each test
keeps a screenshot in its temp dir when it fails.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser import ConsoleErrors, browser, screenshot_on_failure
from tests.launcher_process import SERVE_FLAGS, LauncherProcess, free_port

TIMEOUT_MS = 30_000
expect.set_options(timeout=TIMEOUT_MS)  # a busy machine: generous, these are not speed checks


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with browser() as instance:
        yield instance


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LauncherProcess]:
    models = tmp_path_factory.mktemp("ui") / "models.yaml"
    models.write_text(json.dumps({"models": {"echo": {"options": "--model echo", "idle_timeout": 0}}}))
    process = LauncherProcess(
        workload="standin",
        env={"LAUNCHER_MOCK_GPUS": "1", "LAUNCHER_MOCK_GPU_COUNT": "2", "LAUNCHER_STOP_TIMEOUT": "2",
             "LAUNCHER_MODELS_FILE": str(models), "LAUNCHER_MEMORY_BUDGET": "2GiB"},
    )  # fmt: skip
    yield process
    assert not process.stop()


@pytest.fixture
def page(chromium: Browser, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Page, ConsoleErrors]]:
    context = chromium.new_context()
    opened = context.new_page()
    opened.set_default_timeout(TIMEOUT_MS)
    errors = ConsoleErrors().watch(opened)
    with screenshot_on_failure(opened, tmp_path, request.node.name):
        yield opened, errors
    context.close()


def _row(page: Page, instance_id: str) -> object:
    return page.locator(f'#instances tbody tr[data-id="{instance_id}"]')


def _create(page: Page, options: str, instance_id: str = "") -> None:
    page.fill("#create input[name=options]", options)
    page.fill("#create input[name=id]", instance_id)
    page.click("#create button[type=submit]")


def test_the_page_loads_without_console_errors(launcher: LauncherProcess, page: tuple[Page, ConsoleErrors]) -> None:
    browser_page, errors = page
    browser_page.goto(f"{launcher.base_url}/")  # a browser asking for / lands on the dashboard
    assert browser_page.url.endswith("/ui")
    expect(browser_page.locator("#connection")).to_have_text("live")
    expect(browser_page.locator('#models tbody tr[data-name="echo"]')).to_contain_text("stopped")
    expect(browser_page.locator("#gpus li")).to_have_count(2)
    assert httpx.get(f"{launcher.base_url}/", headers={"Accept": "application/json"}).json()["endpoints"]
    assert errors == []


def test_create_shows_a_row_that_turns_ready_then_delete_removes_it(
    launcher: LauncherProcess, page: tuple[Page, ConsoleErrors]
) -> None:
    browser_page, errors = page
    browser_page.goto(f"{launcher.base_url}/ui")
    expect(browser_page.locator("#connection")).to_have_text("live")
    _create(browser_page, f"--model ui-model --port {free_port()} --host 127.0.0.1 --startup-delay 1", "from-ui")
    row = _row(browser_page, "from-ui")
    expect(row).to_contain_text("starting")  # without a reload: the watch stream
    expect(row).to_contain_text("ready")
    expect(row.locator("td").nth(3)).to_have_text(re.compile(r"^\d+(\.\d+)?$"))  # start seconds
    expect(browser_page.locator("#chart rect")).not_to_have_count(0)

    browser_page.once("dialog", lambda dialog: dialog.accept())  # "Delete instance from-ui?"
    row.locator("button", has_text="Delete").click()
    expect(row).to_have_count(0)
    assert launcher.client.get("/v2/vllm/instances/from-ui").status_code == 404
    assert errors == []


def test_the_log_view_follows_what_the_instance_prints(
    launcher: LauncherProcess, page: tuple[Page, ConsoleErrors]
) -> None:
    browser_page, errors = page
    options = f"--model log-model --port {free_port()} --host 127.0.0.1 --print-env UI_GREETING"
    response = launcher.create("logged", options=options, env_vars={"UI_GREETING": "hello-from-the-instance"})
    assert response.status_code == 201
    browser_page.goto(f"{launcher.base_url}/ui#/instance/logged")
    expect(browser_page.locator("#log")).to_contain_text("ENV UI_GREETING=hello-from-the-instance")
    expect(browser_page.locator("#log")).to_contain_text("standin serving log-model")
    expect(browser_page.locator("#state")).to_contain_text('"instance_id": "logged"')
    created = browser_page.locator('#facts dd[data-fact="Created"]')
    expect(created).to_be_visible()
    assert not re.fullmatch(r"[0-9.]+", created.inner_text()), created.inner_text()  # a date, not Unix seconds
    expect(browser_page.locator('#facts dd[data-fact="Memory"]')).to_have_text(re.compile(r"^\d+ MiB$"))
    launcher.client.delete("/v2/vllm/instances/logged")
    expect(browser_page.locator("#state")).to_have_text("deleted")
    assert errors == []


def test_a_bad_option_shows_the_apis_message(launcher: LauncherProcess, page: tuple[Page, ConsoleErrors]) -> None:
    browser_page, errors = page
    browser_page.goto(f"{launcher.base_url}/ui")
    _create(browser_page, "--model m --no-such-flag")
    expect(browser_page.locator("#create-error")).to_contain_text("400: standin: error: unrecognized arguments")
    assert launcher.client.get("/v2/vllm/instances").json()["instances"] == []
    # The browser reports the 400 of the fetch itself; nothing else may be in the console.
    assert [error for error in errors if "400" not in error] == []


def test_model_profiles_can_be_started_and_stopped(launcher: LauncherProcess, page: tuple[Page, ConsoleErrors]) -> None:
    browser_page, errors = page
    browser_page.goto(f"{launcher.base_url}/ui")
    row = browser_page.locator('#models tbody tr[data-name="echo"]')
    expect(row.locator("td.idle")).to_have_text("never")  # idle_timeout: 0
    expect(row.locator("td.memory")).to_have_text(re.compile(r"^~\d+ MiB$"))
    start, stop = row.locator("button", has_text="start"), row.locator("button", has_text="stop")
    start_box, stop_box = start.bounding_box(), stop.bounding_box()
    assert start_box and stop_box and stop_box["x"] >= start_box["x"] + start_box["width"] + 4  # not touching
    start.click()
    expect(row).to_contain_text("ready")
    row.locator("button", has_text="stop").click()
    expect(row).to_contain_text("stopped")
    assert errors == []


def test_with_a_token_the_page_asks_for_it_and_then_works(chromium: Browser, tmp_path: Path) -> None:
    secured = LauncherProcess(workload="standin", env={"LAUNCHER_API_TOKEN": "s3cret", "LAUNCHER_STOP_TIMEOUT": "2"})
    context = chromium.new_context()
    browser_page = context.new_page()
    browser_page.set_default_timeout(TIMEOUT_MS)
    try:
        with screenshot_on_failure(browser_page, tmp_path, "token"):
            browser_page.goto(f"{secured.base_url}/")  # the redirect needs no token
            dialog = browser_page.locator("#token-dialog")
            expect(dialog).to_be_visible()
            # Behind the prompt nothing is known yet: no "No instances." or "No model profiles".
            expect(browser_page.locator("#no-instances")).to_be_hidden()
            expect(browser_page.locator("#no-models")).to_be_hidden()
            expect(browser_page.locator("#gpus")).to_contain_text("loading")
            browser_page.fill("#token-form input[name=token]", "wrong")
            browser_page.click("#token-form button")
            expect(browser_page.locator("#token-error")).to_contain_text("not the launcher's")
            browser_page.fill("#token-form input[name=token]", "s3cret")
            browser_page.click("#token-form button")
            expect(dialog).to_be_hidden()
            expect(browser_page.locator("#connection")).to_have_text("live")
            expect(browser_page.locator("#no-instances")).to_be_visible()
            expect(browser_page.locator("#gpus")).to_contain_text("no GPUs")
            _create(browser_page, f"--model t --port {free_port()} --host 127.0.0.1", "with-token")
            expect(_row(browser_page, "with-token")).to_contain_text("ready")
            # Kept in this tab's session storage only.
            stored = browser_page.evaluate("() => [sessionStorage.length, localStorage.length]")
            assert stored == [1, 0]
    finally:
        context.close()
        assert not secured.stop()


@pytest.mark.vllm
def test_a_real_vllm_instance_from_the_dashboard(
    chromium: Browser, tiny_model: Path, tmp_path: Path
) -> None:
    from tests.conftest import real_vllm_launcher

    with real_vllm_launcher() as launcher:
        context = chromium.new_context()
        browser_page = context.new_page()
        browser_page.set_default_timeout(240_000)
        errors = ConsoleErrors().watch(browser_page)
        try:
            with screenshot_on_failure(browser_page, tmp_path, "vllm"):
                browser_page.goto(f"{launcher.base_url}/ui")
                _create(browser_page, f"--model {tiny_model} {SERVE_FLAGS}", "tiny-ui")
                expect(_row(browser_page, "tiny-ui")).to_contain_text("ready")
                browser_page.click('#instances a:has-text("tiny-ui")')
                expect(browser_page.locator("#log")).to_contain_text("Application startup complete")
                assert errors == []
        finally:
            context.close()
            launcher.client.delete("/v2/vllm/instances")


def test_memory_budgets_show_as_bars(launcher: LauncherProcess, page: tuple[Page, ConsoleErrors]) -> None:
    browser_page, errors = page
    browser_page.goto(f"{launcher.base_url}/ui")
    host = browser_page.locator('#budgets [data-budget="host"]')
    expect(host).to_contain_text("host: ")
    expect(host).to_contain_text(" of 2.00 GiB")
    assert host.locator("meter").get_attribute("max") == str(2 * 2**30)
    expect(browser_page.locator('#budgets [data-budget="GPU-1"]')).to_contain_text("of 79.00 GiB")  # 80 less 1 reserved
    row = browser_page.locator('#models tbody tr[data-name="echo"]')
    expect(row.locator("td.idle")).to_have_text("never")  # idle_timeout: 0
    expect(row.locator("td.memory")).to_have_text(re.compile(r"^~\d+ MiB$"))
    start, stop = row.locator("button", has_text="start"), row.locator("button", has_text="stop")
    start_box, stop_box = start.bounding_box(), stop.bounding_box()
    assert start_box and stop_box and stop_box["x"] >= start_box["x"] + start_box["width"] + 4  # not touching
    start.click()
    expect(row).to_contain_text("ready")
    expect(host).not_to_contain_text("host: 0 MiB")  # the running instance's PSS, once sampled
    row.locator("button", has_text="stop").click()
    expect(row).to_contain_text("stopped")
    assert errors == []


def test_a_broken_models_file_shows_a_banner_and_an_invalid_model_its_state(
    chromium: Browser, tmp_path: Path
) -> None:
    models = tmp_path / "models.yaml"
    good = 'models:\n  echo: {options: "--model echo"}\n  typo: {options: "--model t --nope"}\n'
    models.write_text(good)
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_MODELS_FILE": str(models)})
    context = chromium.new_context()
    browser_page = context.new_page()
    browser_page.set_default_timeout(TIMEOUT_MS)
    errors = ConsoleErrors().watch(browser_page)
    try:
        with screenshot_on_failure(browser_page, tmp_path, "banner"):
            browser_page.goto(f"{launcher.base_url}/ui")
            expect(browser_page.locator('#models tbody tr[data-name="typo"]')).to_contain_text("invalid")
            expect(browser_page.locator("#file-error")).to_be_hidden()
            models.write_text(good + "  broken: [\n")
            banner = browser_page.locator("#file-error")
            expect(banner).to_be_visible()
            expect(banner).to_contain_text("not reloaded (the running models stay)")
            expect(banner).to_contain_text("line 5")
            models.write_text(good)
            expect(banner).to_be_hidden()
        assert errors == []
    finally:
        context.close()
        assert not launcher.stop()
