"""Headless Chromium for the browser tests (no tests here).

Drives Debian's ``chromium`` through ``chromedriver``'s W3C WebDriver HTTP API with plain
urllib (no extra package). Chromium runs with the network cut off: every request goes to a
proxy at 127.0.0.1:9, where nothing listens, except loopback (which Chromium never proxies) and
file:// pages. A page that still needs a CDN therefore fails here as it would on a train.

Screenshots go to the test's tmp dir, or to ``$CLT_LENS_SCREENSHOT_DIR`` when set.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

OFFLINE_FLAGS = ["--proxy-server=127.0.0.1:9"]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1000", *OFFLINE_FLAGS,
]
ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"  # W3C WebDriver's element reference key
CONTROL = "\ue009"
# Elements that would load something over the network (scripts, stylesheets, images, frames).
REMOTE_REFS_JS = (
    "return Array.from(document.querySelectorAll("
    "'script[src], link[href], img[src], iframe[src]'))"
    ".map(e => e.getAttribute('src') || e.getAttribute('href'))"
    ".filter(u => /^(https?:)?\\/\\//i.test(u))"
)


def chromium_or_skip() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("headless browser test needs Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver)")
    return chromium, driver


def screenshot_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("CLT_LENS_SCREENSHOT_DIR") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


class WebDriver:
    """The few W3C WebDriver commands the tests need, spoken to chromedriver over HTTP."""

    def __init__(self, chromium: str, chromedriver: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([chromedriver, f"--port={port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.profile = tempfile.mkdtemp(prefix="clt-lens-chromium-")
        self.sid = None
        deadline = time.monotonic() + 20
        while True:
            try:
                self._call("GET", "/status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.quit()
                    raise
                time.sleep(0.1)
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {"binary": chromium,
                                   "args": CHROMIUM_FLAGS + [f"--user-data-dir={self.profile}"]},
        }}}
        try:
            self.sid = self._call("POST", "/session", caps)["sessionId"]
        except Exception:
            self.quit()
            raise

    def __enter__(self) -> WebDriver:
        return self

    def __exit__(self, *exc) -> None:
        self.quit()

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["value"]

    def session(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.sid}{path}", body)

    def open(self, url: str) -> None:
        self.session("POST", "/url", {"url": url})

    def js(self, script: str, *args):
        return self.session("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_js(self, script: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(script)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.25)

    def click(self, element: dict) -> None:
        element_id = next(iter(element.values()))
        self.session("POST", f"/element/{element_id}/click", {})

    def actions(self, *sources: dict) -> None:
        """W3C input actions (real key and pointer events), then release every input."""
        self.session("POST", "/actions", {"actions": list(sources)})
        self.session("DELETE", "/actions")

    def ctrl_click(self, element: dict) -> None:
        origin = {ELEMENT_KEY: next(iter(element.values()))}
        pause = {"type": "pause", "duration": 0}
        self.actions(
            {"type": "key", "id": "kb", "actions": [
                {"type": "keyDown", "value": CONTROL}, pause, pause, pause,
                {"type": "keyUp", "value": CONTROL}]},
            {"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
             "actions": [pause, {"type": "pointerMove", "origin": origin, "x": 0, "y": 0},
                         {"type": "pointerDown", "button": 0},
                         {"type": "pointerUp", "button": 0}, pause]})

    def key(self, value: str, down: bool) -> None:
        """Press or release one key, leaving it in that state (no release of inputs)."""
        self.session("POST", "/actions", {"actions": [{"type": "key", "id": "kb", "actions": [
            {"type": "keyDown" if down else "keyUp", "value": value}]}]})

    def type_into(self, element: dict, text: str) -> None:
        element_id = next(iter(element.values()))
        self.session("POST", f"/element/{element_id}/clear", {})
        self.session("POST", f"/element/{element_id}/value", {"text": text})

    def fit_window_to_page(self, max_height: int = 4000) -> None:
        """Make the window as tall as the page (up to ``max_height``) for a whole-page shot."""
        height = self.js("return document.documentElement.scrollHeight")
        self.session("POST", "/window/rect",
                     {"width": 1400, "height": min(height + 140, max_height)})

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.session("GET", "/screenshot")))
        return path

    def console_errors(self) -> list[str]:
        logs = self.session("POST", "/se/log", {"type": "browser"})
        return [entry["message"] for entry in logs if entry.get("level") == "SEVERE"]

    def remote_refs(self) -> list[str]:
        return self.js(REMOTE_REFS_JS)

    def quit(self) -> None:
        try:
            if self.sid is not None:
                self.session("DELETE", "")
        except OSError:
            pass
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)
