"""A loopback HTTP server that plays the web for a synthetic world, broken URLs included.

Routes (anything else, including any path with `..`, is a 404):

    /images/<key>.jpg            200 image/jpeg, the image
    /fault/http_404/<key>.jpg    404
    /fault/corrupt/<key>.jpg     200 image/jpeg, the image's bytes cut before its scan data (undecodable)
    /fault/html/<key>.jpg        200 text/html, a web page instead of an image
    /fault/slow/<key>.jpg        the image, after the world's `slow_seconds`
"""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pyarrow as pa

from pipelines.world.generate import FAULT_TYPES, load_world
from vlp_core.atomic import atomic_write_parquet
from vlp_core.storage import Location, location, read_parquet

# /images/<key>.jpg, or /fault/<fault type>/<key>.jpg
_ROUTE = re.compile(rf"/(?:images|fault/(?P<fault>{'|'.join(FAULT_TYPES)}))/(?P<key>[A-Za-z0-9_-]+)\.jpg")
_JPEG_START_OF_SCAN = b"\xff\xda"
_HTML_PAGE = (
    b"<!doctype html>\n<html><head><title>Product page</title></head>\n"
    b"<body><h1>Great deals</h1><p>Click to buy. Free shipping on all orders.</p></body></html>\n"
)


class _WorldHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a slow request in flight does not hold up stop()

    def __init__(self, address: tuple[str, int], images_dir: Location, slow_seconds: float) -> None:
        self.images_dir = images_dir
        self.slow_seconds = slow_seconds
        super().__init__(address, _WorldRequestHandler)


class _WorldRequestHandler(BaseHTTPRequestHandler):
    server: _WorldHTTPServer

    def do_GET(self) -> None:
        route = _ROUTE.fullmatch(urlsplit(self.path).path)
        image_path = self.server.images_dir / f"{route['key']}.jpg" if route else None
        fault = route["fault"] if route else None
        if image_path is None or not image_path.is_file() or fault == "http_404":
            self._send(404, "text/plain", b"not found\n")
        elif fault == "html":
            self._send(200, "text/html; charset=utf-8", _HTML_PAGE)
        elif fault == "corrupt":
            image = image_path.read_bytes()
            self._send(200, "image/jpeg", image[: image.index(_JPEG_START_OF_SCAN)])
        else:
            if fault == "slow":
                time.sleep(self.server.slow_seconds)
            self._send(200, "image/jpeg", image_path.read_bytes())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet: a download of thousands of URLs would flood stderr."""


class WorldServer:
    """Serves a world folder's web images on `host` (loopback by default); port 0 picks a free port.

    Use as a context manager, or call start() and stop().
    """

    def __init__(self, world_dir: Location, host: str = "127.0.0.1", port: int = 0) -> None:
        config, self.paths = load_world(world_dir)
        self.slow_seconds = config.slow_seconds
        self.host, self.port = host, port
        self._server: _WorldHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """e.g. "http://127.0.0.1:41234" (only once started: the port may be chosen by the OS)."""
        if self._server is None:
            raise RuntimeError("WorldServer is not running; call start() or use it in a `with` block")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> WorldServer:
        if self._server is not None:
            raise RuntimeError(f"WorldServer already running at {self.base_url}")
        self._server = _WorldHTTPServer((self.host, self.port), self.paths.web_images, self.slow_seconds)
        self._thread = threading.Thread(target=self._server.serve_forever, name="world-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket (freeing the port) and join the server thread."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = None

    def __enter__(self) -> WorldServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def write_url_list(self, path: Location) -> Location:
        """Write the img2dataset input list (Parquet: url, caption) of every web pair to `path`, atomically."""
        pairs = read_parquet(self.paths.web_pairs, columns=["path", "caption"])
        urls = [f"{self.base_url}/{url_path}" for url_path in pairs["path"].to_pylist()]
        return atomic_write_parquet(pa.table({"url": urls, "caption": pairs["caption"]}), location(path))
