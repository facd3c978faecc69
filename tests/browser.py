"""A small client of the Chrome DevTools Protocol for tests in a real browser: the operating system's
headless Chromium (Debian's ``chromium``, installed by scripts/test.sh), driven over
``--remote-debugging-pipe`` with the standard library only (no browser download, no driver, no
websocket package).

It opens a page, runs JavaScript in it, clicks and presses keys as a person would (input events at
the element's place on the screen), takes screenshots, and records every console error, uncaught
exception and network request of the page.

Example:
    with Browser() as b:
        b.open(Path("report.html"))
        b.click("#cases tbody tr")
        png = b.screenshot()
        assert not b.errors and b.requests_off_page() == []
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

# The flags a headless Chromium needs as root on a machine with no display, no GPU and no network
# beyond the package registries: no sandbox (root), no GPU process, no first-run, sync, component
# or background connections (they would be refused, and must not count as the page's requests).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio", "--hide-scrollbars",
         "--force-device-scale-factor=1")


def chromium_path() -> str | None:
    """The Chromium to test with: ``$MEDSSM_CHROMIUM``, else ``chromium`` (Debian's) on the PATH."""
    return os.environ.get("MEDSSM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page (a tab); use as a context manager."""

    def __init__(self, executable: str | None = None, width: int = 1400, height: int = 1000, timeout: float = 30.0):
        self.executable = executable or chromium_path()
        if not self.executable:
            raise BrowserError("no Chromium found (install Debian's chromium, or set MEDSSM_CHROMIUM)")
        self.width, self.height, self.timeout = width, height, timeout
        self.errors: list[str] = []      # console errors, uncaught exceptions, failed loads
        self.requests: list[str] = []    # the URL of every request the page made
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._events: list[dict] = []
        self._cond = threading.Condition()

    # -- process and protocol ------------------------------------------------------------------
    def __enter__(self) -> Browser:
        self._profile = tempfile.mkdtemp(prefix="medssm-chromium-")
        self._log = open(Path(self._profile) / "chromium.log", "wb")
        # fd 3: commands to the browser, fd 4: its replies (--remote-debugging-pipe), taken from
        # this process's stdin and stdout pipes by the shell.
        args = [self.executable, *FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-pipe",
                f"--window-size={self.width},{self.height}", "about:blank"]
        self._proc = subprocess.Popen(["sh", "-c", 'exec "$@" 3<&0 4>&1 </dev/null >/dev/null', "sh", *args],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1,
                  mobile=False)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = self._proc.stdout.read1(1 << 16)
            if not chunk:
                with self._cond:
                    self._cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._cond:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self._on_event(msg)
                        self._events.append(msg)
                    self._cond.notify_all()

    def _on_event(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = params["exceptionDetails"]
            self.errors.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                            for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.errors.append("log: " + params["entry"].get("text", "") + " " + params["entry"].get("url", ""))
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Network.loadingFailed":
            self.errors.append(f"load failed: {params.get('errorText')}")

    def _post(self, method: str, params: dict, session: bool) -> int:
        with self._cond:
            self._next_id += 1
            mid = self._next_id
        msg = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = self._session
        self._proc.stdin.write(json.dumps(msg).encode() + b"\0")
        self._proc.stdin.flush()
        return mid

    def _wait_reply(self, mid: int, method: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self._proc.poll() is not None:
                    raise BrowserError(f"{method}: no reply from Chromium (see {self._log.name})")
                self._cond.wait(left)
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def call(self, method: str, timeout: float | None = None, **params) -> dict:
        """A browser-level command (no page session)."""
        return self._wait_reply(self._post(method, params, session=False), method, timeout or self.timeout)

    def send(self, method: str, timeout: float | None = None, **params) -> dict:
        """A command to the page."""
        return self._wait_reply(self._post(method, params, session=True), method, timeout or self.timeout)

    def wait_event(self, method: str, since: int = 0, timeout: float | None = None) -> dict:
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cond:
            while True:
                for e in self._events[since:]:
                    if e.get("method") == method:
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrowserError(f"no {method} within the time limit")
                self._cond.wait(left)

    # -- what a test does --------------------------------------------------------------------
    def open(self, path: Path | str) -> None:
        """Open a file (or URL) and wait for its load event."""
        url = Path(path).resolve().as_uri() if not str(path).startswith(("file:", "about:")) else str(path)
        with self._cond:
            since = len(self._events)
        self.send("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired", since)

    def js(self, expression: str, timeout: float | None = None):
        """The value of a JavaScript expression in the page (promises are awaited)."""
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True,
                      timeout=timeout)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise BrowserError(f"{expression[:80]}: {d.get('exception', {}).get('description') or d.get('text')}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None):
        """Wait until a JavaScript expression is truthy; returns its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"still false after {timeout or self.timeout} s: {expression}")
            time.sleep(0.05)

    def rect(self, selector: str) -> dict:
        """The element's box on the page (CSS pixels, scrolled into view first)."""
        # The part of the element a person sees: its box cut by every scrolled or clipped ancestor.
        r = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
                    " e.scrollIntoView({block: 'center', inline: 'nearest'}); const r = e.getBoundingClientRect();"
                    " let [x0, y0, x1, y1] = [r.left, r.top, r.right, r.bottom];"
                    " for (let a = e.parentElement; a; a = a.parentElement) {"
                    "   const s = getComputedStyle(a);"
                    "   if (s.overflowX === 'visible' && s.overflowY === 'visible') continue;"
                    "   const q = a.getBoundingClientRect(); x0 = Math.max(x0, q.left); y0 = Math.max(y0, q.top);"
                    "   x1 = Math.min(x1, q.right); y1 = Math.min(y1, q.bottom); }"
                    " x1 = Math.min(x1, innerWidth); y1 = Math.min(y1, innerHeight);"
                    " return {x: x0, y: y0, width: Math.max(0, x1 - x0), height: Math.max(0, y1 - y0)}; })()")
        if r is None:
            raise BrowserError(f"no element {selector}")
        return r

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        r = self.rect(selector)
        x, y = r["x"] + r["width"] / 2, r["y"] + r["height"] / 2
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def move(self, x: float, y: float) -> None:
        """The mouse moved to a point of the page (CSS pixels of the viewport)."""
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def type(self, text: str) -> None:
        """Text typed into the focused element."""
        self.send("Input.insertText", text=text)

    def press(self, key: str, code: str | None = None, key_code: int | None = None) -> None:
        """A key pressed and released in the focused element, e.g. ``press("ArrowRight", key_code=39)``."""
        for kind in ("rawKeyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key=key, code=code or key,
                      windowsVirtualKeyCode=key_code or 0)

    def screenshot(self, selector: str | None = None, path: Path | None = None) -> bytes:
        """A PNG of the viewport, or of one element's box."""
        params = {"format": "png"}
        if selector:  # the clip is in the document's coordinates, the box in the viewport's
            r = self.rect(selector)
            sx, sy = self.js("[window.scrollX, window.scrollY]")
            params["clip"] = {**r, "x": r["x"] + sx, "y": r["y"] + sy, "scale": 1}
        png = base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])
        if path is not None:
            Path(path).write_bytes(png)
        return png

    def full_screenshot(self, path: Path | None = None) -> bytes:
        """A PNG of the whole page, top to bottom."""
        size = self.js("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
        png = base64.b64decode(self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                         clip={"x": 0, "y": 0, "width": size[0], "height": size[1],
                                               "scale": 1})["data"])
        if path is not None:
            Path(path).write_bytes(png)
        return png

    def requests_off_page(self) -> list[str]:
        """Requests that would leave the machine: anything but the page's own file and inline data."""
        return [u for u in self.requests if not u.startswith(("file:", "data:", "blob:", "about:"))]
