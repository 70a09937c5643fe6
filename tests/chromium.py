"""Drive headless Chromium (Debian's `chromium`) from the tests, with the standard library only.

    python tests/chromium.py detections/report.html report.png     # a screenshot of a page, 1200x900

Chromium speaks the DevTools protocol over two pipes (--remote-debugging-pipe: it reads commands on its
file descriptor 3 and writes replies on 4, each a JSON message ended by a NUL byte), so no WebSocket
client, no Selenium and no Playwright are needed: open a page, wait for its load event, evaluate
JavaScript in it, take a screenshot. The flags are those headless Chromium needs as root on a machine
without network (no sandbox, no GPU, no background connections) and a fresh profile each time.
"""
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--mute-audio", "--remote-debugging-pipe")


def find_chromium():
    """The Chromium executable ($CHROMIUM, else chromium or chromium-browser on PATH), or None."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """with Chromium() as browser: browser.open(path); browser.evaluate("document.title"); browser.screenshot(png)"""

    def __init__(self, executable=None, width=1200, height=900, timeout=60):
        self.executable, self.size, self.timeout = executable or find_chromium(), (width, height), timeout
        if not self.executable:
            raise FileNotFoundError("chromium is not installed (Debian: apt-get install chromium)")

    def __enter__(self):
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_browser, self._commands = os.pipe()  # we write commands, Chromium reads them on its fd 3
        self._replies, from_browser = os.pipe()  # Chromium writes replies on its fd 4

        def pipes():  # in the child, before exec
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.process = subprocess.Popen([self.executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                        pass_fds=(3, 4), preexec_fn=pipes, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._id, self.events = b"", 0, []
        try:
            page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
            self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
            self.send("Page.enable", session=self.session)
            self.send("Emulation.setDeviceMetricsOverride", session=self.session, width=self.size[0],
                      height=self.size[1], deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        try:
            if self.process.poll() is None:
                try:
                    self.send("Browser.close")
                except (OSError, EOFError, RuntimeError, TimeoutError):
                    pass
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            for fd in (self._commands, self._replies):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self.profile, ignore_errors=True)

    def send(self, method, session=None, **params):
        """One DevTools command; its result (a dict). Events that arrive meanwhile go to self.events."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" not in self._buffer:
                if not select.select([self._replies], [], [], max(deadline - time.monotonic(), 0))[0]:
                    raise TimeoutError(f"chromium did not answer {method} within {self.timeout} s")
                chunk = os.read(self._replies, 1 << 20)
                if not chunk:
                    raise EOFError(f"chromium closed the pipe (exit status {self.process.poll()})")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if "method" in reply:
                self.events.append(reply)
            elif reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, path):
        """Load a local file and wait for its load event (its images and scripts done)."""
        self.events.clear()
        result = self.send("Page.navigate", session=self.session, url=Path(path).resolve().as_uri())
        if result.get("errorText"):
            raise RuntimeError(f"{path}: {result['errorText']}")
        deadline = time.monotonic() + self.timeout
        while not any(e["method"] == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path}: no load event within {self.timeout} s")
            self.evaluate("0")  # reads the events that came meanwhile
        return self

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page (a promise is awaited), as JSON gives it back."""
        result = self.send("Runtime.evaluate", session=self.session, expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('exception', result)}")
        return result["result"].get("value")

    def screenshot(self, path):
        """The viewport as a PNG file."""
        data = self.send("Page.captureScreenshot", session=self.session, format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1].strip())
    with Chromium() as browser:
        browser.open(sys.argv[1])
        browser.evaluate("Promise.all(Array.from(document.images, i => { i.loading = 'eager'; "  # lazy ones too
                         "return i.decode().catch(() => null); }))")
        print(browser.screenshot(sys.argv[2]))
