"""A minimal Chrome DevTools Protocol client over `--remote-debugging-pipe` (no packages).

Chromium reads commands from its fd 3 and writes replies and events to its fd 4,
each message a JSON object followed by a NUL byte. We hand it two pipes on those
numbers through `bash -c 'exec ... 3<&R 4>&W'` (dash takes only one-digit fds), so
no preexec_fn runs in a process that has threads.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-extensions", "--disable-dev-shm-usage", "--window-size=1000,720",
                  "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


class CDPError(RuntimeError):
    pass


class Browser:
    def __init__(self, binary: str, user_data_dir: Path, timeout_s: float = 30.0) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        cmd = ["bash", "-c", f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', "bash", binary,
               *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"]
        self.log_path = user_data_dir.parent / "chromium.log"
        with open(self.log_path, "wb") as log:  # its stderr, for when it does not start
            self.proc = subprocess.Popen(cmd, pass_fds=(to_chrome_r, from_chrome_w),
                                         stdout=log, stderr=log)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.timeout_s = timeout_s
        self._buf = b""
        self._next_id = 0
        self.session: str | None = None

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise CDPError("timed out waiting for Chromium")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise CDPError(f"Chromium closed the pipe (exit status {self.proc.poll()}); "
                               f"see {self.log_path}")
            self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        """One command; returns its result (events that arrive meanwhile are dropped)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})
        deadline = time.monotonic() + self.timeout_s
        while self.eval("location.href + ' ' + document.readyState") != f"{url} complete":
            if time.monotonic() > deadline:
                raise CDPError(f"{url} did not load")
            time.sleep(0.02)

    def reload(self) -> None:
        """Reload the page and wait until the new document has loaded (the old one is
        marked first, so that its readyState is not taken for the new one's)."""
        self.eval("window.__before_reload = true")
        self.send("Page.reload")
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:   # while the page navigates, its context may be gone for a moment
                if not self.eval("window.__before_reload || document.readyState !== 'complete'"):
                    return
            except CDPError:
                pass
            if time.monotonic() > deadline:
                raise CDPError("the page did not reload")
            time.sleep(0.02)

    def set_viewport(self, width: int, height: int, mobile: bool = False) -> None:
        """Lay the page out for another screen (mobile: a phone's viewport rules)."""
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                         "deviceScaleFactor": 1, "mobile": mobile})

    def eval(self, expression: str) -> Any:
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": True})
        if "exceptionDetails" in r:
            raise CDPError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def type_text(self, text: str) -> None:
        self.send("Input.insertText", {"text": text})

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                 "windowsVirtualKeyCode": 13, "text": "\r"})

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
        except (CDPError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            os.close(fd)
