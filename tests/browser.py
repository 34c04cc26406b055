"""A real browser for the dashboard tests: Debian's chromium, driven by Playwright.

Playwright never downloads a browser here: it launches the system's chromium (``$CHROMIUM``, or
``chromium`` on the PATH; ``make test`` installs it). :func:`screenshot` is also what made the
README's picture (``make screenshot``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    """The system's chromium, or None."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


@contextlib.contextmanager
def browser() -> Iterator[Browser]:
    """A headless chromium (no sandbox: tests may run as root in a container)."""
    executable = chromium_path()
    if executable is None:
        raise RuntimeError("no chromium: `apt-get install chromium` (make test does it) or set $CHROMIUM")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield instance
        finally:
            instance.close()


class ConsoleErrors(list[str]):
    """Console errors and uncaught exceptions of a page, as they happen."""

    def watch(self, page: Page) -> ConsoleErrors:
        page.on("console", lambda message: self.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: self.append(f"uncaught: {error}"))
        return self


def screenshot(page: Page, path: Path) -> Path:
    """A full-page PNG of ``page`` at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


@contextlib.contextmanager
def screenshot_on_failure(page: Page, folder: Path, name: str) -> Iterator[None]:
    """Keep a screenshot in ``folder`` (the test's temp dir) when the block fails."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            print(f"screenshot: {screenshot(page, folder / f'{name}-failure.png')}")
        raise
