"""A tiny headless-Chromium driver over the DevTools protocol: open a page, collect console errors, screenshot.

Needs a Chromium binary (Debian: ``apt-get install chromium``) and ``websocket-client``
(``pip install topotorch[browser]``); no browser downloads.

    >>> with Browser() as b:
    ...     page = b.open("file:///tmp/report.html")
    ...     page.errors, page.evaluate("document.querySelectorAll('svg line').length")
    ...     page.screenshot("shot.png")
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary ($CHROMIUM first), or None."""
    env = os.environ.get("CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in CANDIDATES:
        p = shutil.which(name)
        if p:
            return p
    return None


class Page:
    """One open tab: ``evaluate(js)``, ``errors`` (console errors and uncaught exceptions), ``screenshot(path)``."""

    def __init__(self, ws, timeout: float):
        self._ws, self._id, self.timeout = ws, 0, timeout
        self.errors: list[str] = []
        self.events: list[dict] = []

    def _handle(self, msg: dict) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        self.events.append(msg)
        if method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.errors.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            self.errors.append(f"{e.get('source')}: {e.get('text')} {e.get('url', '')}".strip())

    def send(self, method: str, **params: Any) -> dict:
        """Send one DevTools command and wait for its result (events met meanwhile are recorded)."""
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        end = time.monotonic() + self.timeout
        while time.monotonic() < end:
            msg = json.loads(self._ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._handle(msg)
        raise TimeoutError(f"no answer to {method} within {self.timeout} s")

    def wait_event(self, method: str) -> dict:
        for msg in self.events:
            if msg.get("method") == method:
                return msg
        end = time.monotonic() + self.timeout
        while time.monotonic() < end:
            msg = json.loads(self._ws.recv())
            self._handle(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(f"no {method} within {self.timeout} s")

    def evaluate(self, expression: str) -> Any:
        """Value of a JavaScript expression in the page (JSON-serialisable values)."""
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression!r} threw: {r['exceptionDetails'].get('text')}")
        return r.get("result", {}).get("value")

    def screenshot(self, path: Path | str) -> Path:
        """Save a PNG of the whole page."""
        r = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path = Path(path)
        path.write_bytes(base64.b64decode(r["data"]))
        return path


class Browser:
    """Headless Chromium with a private profile, started on enter and killed on exit."""

    def __init__(self, binary: str | None = None, width: int = 1400, height: int = 1000, timeout: float = 30.0):
        found = binary or find_chromium()
        if found is None:
            raise FileNotFoundError("no Chromium found (apt-get install chromium, or set $CHROMIUM)")
        self.binary: str = found
        self.width, self.height, self.timeout = width, height, timeout
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._sockets: list = []

    def __enter__(self) -> Browser:
        # Chromium's helper processes may still write the profile while it is removed: ignore that race
        self._tmp = tempfile.TemporaryDirectory(prefix="topotorch-chromium-", ignore_cleanup_errors=True)
        args = [
            self.binary,
            "--headless=new",
            "--remote-debugging-port=0",
            f"--user-data-dir={self._tmp.name}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            f"--window-size={self.width},{self.height}",
            "about:blank",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        # its own process group, so closing kills the renderer and GPU helpers too
        self._proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        port_file = Path(self._tmp.name) / "DevToolsActivePort"
        end = time.monotonic() + self.timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.binary} exited with code {self._proc.returncode} before DevTools came up")
            if time.monotonic() > end:
                raise TimeoutError("Chromium did not open its DevTools port")
            time.sleep(0.05)
        self.port = int(port_file.read_text().split()[0])
        return self

    def open(self, url: str) -> Page:
        """Open ``url`` in a fresh tab and wait for its load event."""
        import websocket

        # a busy machine may announce the DevTools port before it accepts connections: retry briefly
        end = time.monotonic() + self.timeout
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
                target = json.loads(urllib.request.urlopen(req, timeout=self.timeout).read())
                ws = websocket.create_connection(
                    target["webSocketDebuggerUrl"], timeout=self.timeout, suppress_origin=True
                )
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.2)
        self._sockets.append(ws)
        page = Page(ws, self.timeout)
        for domain in ("Runtime", "Log", "Page"):
            page.send(f"{domain}.enable")
        page.send(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        page.send("Page.navigate", url=url)
        page.wait_event("Page.loadEventFired")
        return page

    def __exit__(self, *exc: Any) -> None:
        for ws in self._sockets:
            try:
                ws.close()
            except Exception:  # noqa: BLE001 - closing a dead socket
                pass
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self._proc.kill()
            self._proc.wait(timeout=10)
        if self._tmp is not None:
            self._tmp.cleanup()
