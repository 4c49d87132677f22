"""Open a local page in headless Chromium over the DevTools protocol: console errors, failed loads,
image states and a full-page screenshot.

Chromium is Debian's `chromium` (`apt-get install chromium`); `find_chromium` says where it is.
The browser runs as its own process group with a private profile, and only on 127.0.0.1.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from processes import stop_group, wait_until
from websockets.sync.client import connect

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--no-default-browser-check",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1280,900",
)
START_TIMEOUT_S = 60
PAGE_TIMEOUT_S = 60

IMAGES_JS = """JSON.stringify(Array.from(document.images).map(img => ({
    src: img.getAttribute('src'), complete: img.complete, width: img.naturalWidth})))"""


def find_chromium() -> str | None:
    """The Chromium executable: $CHROMIUM, else `chromium` on the PATH."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium")


@dataclass
class PageVisit:
    """What happened when a page was opened."""

    console_errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, failed loads
    images: list[dict[str, Any]] = field(default_factory=list)  # {"src", "complete", "width"} per <img>
    title: str = ""

    @property
    def broken_images(self) -> list[str]:
        return [image["src"] for image in self.images if not image["complete"] or image["width"] == 0]


class DevToolsPage:
    """One page target of a running Chromium, driven by numbered DevTools commands."""

    def __init__(self, websocket_url: str) -> None:
        self.socket = connect(websocket_url, max_size=None, open_timeout=PAGE_TIMEOUT_S)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command and return its result; events that arrive meanwhile are kept in `events`."""
        command_id = next(self.ids)
        self.socket.send(json.dumps({"id": command_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=PAGE_TIMEOUT_S))
            if message.get("id") == command_id:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for_event(self, method: str) -> dict[str, Any]:
        """The first event named `method` (already received or next to arrive)."""
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            message = json.loads(self.socket.recv(timeout=PAGE_TIMEOUT_S))
            self.events.append(message)
            if message.get("method") == method:
                return message

    def evaluate(self, expression: str) -> Any:
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"]["value"]

    def close(self) -> None:
        self.socket.close()


class Chromium:
    """A headless Chromium with a private profile; a context manager that stops it and its children."""

    def __init__(self, executable: str) -> None:
        self.executable = executable

    def __enter__(self) -> Chromium:
        self.profile = Path(tempfile.mkdtemp(prefix="capfilt-chromium-"))
        self.log = open(self.profile / "chromium.log", "wb")
        self.process = subprocess.Popen(
            [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        port_file = self.profile / "DevToolsActivePort"
        try:
            wait_until(
                lambda: port_file.is_file() and port_file.read_text().strip() != "" or self._exited(),
                "chromium DevTools port",
                START_TIMEOUT_S,
            )
            if self._exited():
                raise RuntimeError(
                    f"chromium exited ({self.process.returncode}): "
                    f"{(self.profile / 'chromium.log').read_text()[-2000:]}"
                )
            self.port = int(port_file.read_text().split()[0])
        except BaseException:
            self.__exit__()
            raise
        return self

    def _exited(self) -> bool:
        return self.process.poll() is not None

    def __exit__(self, *exc: object) -> None:
        if not self._exited():
            stop_group(self.process)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def visit(self, page_path: Path, screenshot: Path | None = None) -> PageVisit:
        """Open `page_path` (a local file) in a new tab, wait for its load event, and report console
        errors, failed loads and images; with `screenshot`, save a full-page PNG there."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(request, timeout=PAGE_TIMEOUT_S) as response:
            target = json.loads(response.read())
        page = DevToolsPage(target["webSocketDebuggerUrl"])
        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                page.send(f"{domain}.enable")
            page.events.clear()
            page.send("Page.navigate", url=Path(page_path).resolve().as_uri())
            page.wait_for_event("Page.loadEventFired")
            visit = PageVisit(images=json.loads(page.evaluate(IMAGES_JS)), title=page.evaluate("document.title"))
            if screenshot is not None:
                size = page.send("Page.getLayoutMetrics")["cssContentSize"]
                clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
                data = page.send("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)["data"]
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                screenshot.write_bytes(base64.b64decode(data))
            visit.console_errors = _errors(page.events)
            return visit
        finally:
            page.close()


def _errors(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions, error log entries and failed network loads among `events`."""
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            values = (arg.get("value", arg.get("description")) for arg in params["args"])
            errors.append("console: " + " ".join(str(value) for value in values))
        elif method == "Runtime.exceptionThrown":
            errors.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")
        elif method == "Network.loadingFailed":
            errors.append(f"load failed: {params.get('errorText')} ({params.get('requestId')})")
    return errors
