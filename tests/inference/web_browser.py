"""Driving the ``unimoe web`` page in headless Chromium (Debian's package) with Playwright: start the
page, ask with uploads, read the streamed answer and errors. The browser test and the README's
screenshot both go through these functions."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def web_server(*args: str, timeout: float = 120):
    """``unimoe web ARGS`` on a free loopback port; yields its URL."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "unimoe.cli", "web", *args, "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"unimoe web exited: {process.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def browser_page(url: str, width: int = 1100, height: int = 900):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.wait_for_selector("textarea")
            yield page
        finally:
            browser.close()


def ask(page, text: str, files: list[Path] = (), timeout_ms: int = 60_000) -> None:
    """Uploads ``files``, types ``text`` and sends it."""
    if files:
        page.set_input_files("input[type=file]", [str(f) for f in files])
        page.wait_for_function(  # each finished upload shows a thumbnail in the textbox
            "n => document.querySelectorAll('.thumbnail-item').length >= n",
            arg=len(files),
            timeout=timeout_ms,
        )
    page.fill("textarea", text)
    page.keyboard.press("Enter")


def bot_messages(page):
    return page.locator('[data-testid="bot"]')
