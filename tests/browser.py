"""Browser checks: Debian's headless Chromium through Playwright, and the CLI's servers (`ui`, `dashboard`)."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tests.conftest import missing_dependency, required_module

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; never `playwright install`
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STOP_SECONDS = 60
ROWS = ".ag-pinned-left-cols-container .ag-row"  # MLflow's runs table: one row per shown run, keyed by row-id
EXPAND = "button[data-component-id*=runnamecellrenderer]"  # the +/- beside a parent run's name
DASHBOARD_MISSING = "optuna-dashboard is not installed: pip install -e '.[dashboard]' (make install-dev does)"


_chromium: list[Any] = []  # [playwright, browser]: one headless Chromium a pytest process, started by its first page


def _browser() -> Any:
    """The process's Chromium, launched on first use (or again, were it gone) and closed when the process exits."""
    if _chromium and _chromium[1].is_connected():
        return _chromium[1]
    sync_api = required_module("playwright.sync_api", "the playwright package is not installed (make install-dev)")
    playwright = sync_api.sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    if not _chromium:
        atexit.register(_close_chromium)
    _chromium[:] = [playwright, browser]
    return browser


def _close_chromium() -> None:
    playwright, browser = _chromium
    with contextlib.suppress(Exception):  # the process is ending: a browser already gone needs no closing
        browser.close()
    playwright.stop()


@contextlib.contextmanager
def chromium_page(*, allow: str = "") -> Iterator[tuple[Any, list[str]]]:
    """A headless Chromium page; JavaScript errors, and any request outside the origin `allow`, are collected.

    Requests outside `allow` are refused: a page that needs the internet fails the test instead of hanging.
    Each page has a browser context of its own (cookies, storage and cache start empty): what one test's page
    did, another's does not see; the browser itself is started once a process (its start costs seconds).
    """
    if not CHROMIUM.exists():
        missing_dependency(f"headless Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    problems: list[str] = []

    def refuse(route: Any) -> None:
        problems.append(f"network request: {route.request.url}")
        route.abort()

    context = _browser().new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", lambda msg: msg.type == "error" and problems.append(f"console error: {msg.text}"))
        outside = rf"^(?!{re.escape(allow)}/)(https?|wss?)://" if allow else r"^(https?|wss?)://"
        page.route(re.compile(outside), refuse)
        yield page, problems
    finally:
        context.close()


def open_runs_table(page: Any, url: str) -> None:
    """Open the runs table and wait for its rows (it says "0 matching runs" while it loads)."""
    page.goto(url)
    page.locator(".ag-center-cols-container .ag-row").first.wait_for(timeout=90_000)
    close = page.get_by_role("button", name="Close", exact=True)  # the assistant panel takes a third of the width
    if close.count():
        close.first.click()


class Lines:
    """A process's stdout, read by a thread (select() misses lines already buffered), searched by content."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self.process = process
        self.queue: queue.Queue[str] = queue.Queue()
        stdout = process.stdout
        threading.Thread(target=lambda: [self.queue.put(line) for line in stdout], daemon=True).start()

    def line_with(self, needle: str, *, seconds: float) -> str:
        """The next line holding `needle`, stripped; fails after `seconds` or when the process has ended."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.queue.get(timeout=min(left, 1.0))
            except queue.Empty:
                if self.process.poll() is not None and self.queue.empty():
                    break
                continue
            if needle in line:
                return line.strip()
        raise AssertionError(f"no line with {needle!r} within {seconds} s (exit code {self.process.poll()})")


def read_line_with(process: subprocess.Popen[str], needle: str, *, seconds: float) -> str:
    """The first stdout line of `process` holding `needle`."""
    return Lines(process).line_with(needle, seconds=seconds)


@dataclasses.dataclass
class Served:
    """A CLI server that printed its URL: `url`, and after the block, how it stopped."""

    url: str
    lines: Lines
    exit_code: int | None = None
    goodbye: str = ""


@contextlib.contextmanager
def serving(
    command: Sequence[str], *, cwd: Path, env: dict[str, str], needle: str, goodbye: str, log: Path
) -> Iterator[Served]:
    """Start a serving CLI command, yield the URL from its line with `needle`, stop it with Ctrl-C (SIGINT)."""
    with log.open("w") as stderr:
        process = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            lines = Lines(process)
            served = Served(url=lines.line_with(needle, seconds=180).split(": ", 1)[1].split()[0], lines=lines)
            yield served
            process.send_signal(signal.SIGINT)
            served.goodbye = lines.line_with(goodbye, seconds=STOP_SECONDS)
            served.exit_code = process.wait(timeout=STOP_SECONDS)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def nothing_listens(url: str) -> bool:
    """No server answers at `url`'s host and port any more."""
    address = urlparse(url)
    with socket.socket() as probe:
        return probe.connect_ex((address.hostname or "", address.port or 80)) != 0
