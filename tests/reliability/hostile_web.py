"""A hostile web on loopback for the reliability tests.

`HostileWeb` answers each path with a scripted `Reply`: bad images, images that must work, 404s,
hangs, drips, oversized bodies and redirects (to itself, in a loop, to 169.254.169.254, to another
loopback address, to file:// and ftp://). A second server on 127.0.0.2 plays the internal network:
the download allows 127.0.0.1/32 only, so nothing may ever reach it.
"""

from __future__ import annotations

import functools
import io
import struct
import threading
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from flows.prefect_server import free_port
from pipelines.manifests.manifest import Generation

INTERNAL_HOST = "127.0.0.2"
BOMB_SIDE = 9000  # 81 Mpx declared (> the 64 Mpx limit): 243 MB decoded from a ~240 kB PNG
HTML_PAGE = b"<!doctype html><html><body><h1>Click to buy</h1></body></html>"


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def half_red(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue: shows rotation and flips."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


def png_bomb(side: int) -> bytes:
    """A valid RGB PNG of side x side black pixels; zlib squeezes its rows to almost nothing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), b"\x00" * (1 + 3 * side)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@functools.cache
def image_payloads() -> dict[str, bytes]:
    """Bytes of every image case, shared by the download path and the model-side loader tests."""
    jpeg = encode(half_red(), "JPEG", quality=95)
    frames = [Image.new("RGB", (30, 10), color) for color in ("red", "blue")]
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 0], rgba[:, 10:, 3] = 255, 255  # red; left half fully transparent
    rotated = half_red()
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    return {
        "jpeg": jpeg,
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "empty": b"",
        "html": HTML_PAGE,
        "bomb": png_bomb(BOMB_SIDE),
        "animated_gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0),
        "cmyk_jpeg": encode(Image.new("CMYK", (16, 8), (0, 255, 255, 0)), "JPEG", quality=95),
        "png_16bit": encode(Image.fromarray(np.full((8, 16), 30000, np.uint16)), "PNG"),
        "rgba_png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "exif_rotated": encode(rotated, "JPEG", quality=95, exif=exif.tobytes()),
    }


@dataclass(frozen=True)
class Reply:
    status: int = 200
    content_type: str = "image/jpeg"
    body: bytes = b""
    location: str | None = None  # a redirect target
    send_length: bool = True  # False: no Content-Length, the body ends when the connection closes
    declared_extra: int = 0  # Content-Length declares this many bytes more than the body (which is then cut)
    hang_s: float = 0.0  # wait this long before answering
    drip_s: float = 0.0  # send the body one byte at a time, this long apart
    headers: tuple[tuple[str, str], ...] = ()  # more response headers, e.g. X-Robots-Tag


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, routes: dict[str, Reply]) -> None:
        self.routes, self.hits, self.stopping = routes, [], threading.Event()
        super().__init__((host, 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        reply = self.server.routes.get(self.path, Reply(404, "text/plain", b"not found"))
        if reply.hang_s and self.server.stopping.wait(reply.hang_s):
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        if reply.location:
            self.send_header("Location", reply.location)
        if reply.send_length:
            self.send_header("Content-Length", str(len(reply.body) + reply.declared_extra))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        try:
            if not reply.drip_s:
                self.wfile.write(reply.body)
            for byte in reply.body if reply.drip_s else b"":
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                if self.server.stopping.wait(reply.drip_s):
                    return
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


class HostileWeb:
    """A threaded HTTP server on `host` answering `routes`; records every path it was asked for."""

    def __init__(self, host: str, routes: dict[str, Reply]) -> None:
        self._server = _Server(host, routes)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def hits(self) -> list[str]:
        return self._server.hits

    def __enter__(self) -> HostileWeb:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


# images served with an X-Robots-Tag: name, the header's value, expected reject reason (None: downloaded)
OPT_OUT_CASES = (
    ("robots_noai", "noai", "opt_out"),
    ("robots_noimageindex", "nofollow, noimageindex", "opt_out"),
    ("robots_other_crawler", "somebot: noai", None),  # addressed to another crawler only
    ("robots_nofollow", "nofollow", None),
)


# name -> (path on the hostile web, or a full URL where "{web}" is the hostile web's host:port; reply;
# expected reject reason or None for success)
def download_cases(internal: str) -> dict[str, tuple[str, Reply | None, str | None]]:
    images = image_payloads()
    bad_image = {"truncated_jpeg": "decode_error", "empty": "empty_body", "bomb": "too_large"}
    cases = {name: (f"/{name}", Reply(body=images[name]), reason) for name, reason in bad_image.items()}
    cases.update(
        {
            name: (f"/{name}", Reply(body=images[name]), None)
            for name in ("jpeg", "animated_gif", "cmyk_jpeg", "png_16bit", "rgba_png", "exif_rotated")
        }
    )
    cases.update(
        {
            "html_as_jpeg": ("/html_as_jpeg", Reply(body=HTML_PAGE), "decode_error"),
            "html_page": ("/html_page", Reply(content_type="text/html", body=HTML_PAGE), "decode_error"),
            "json_body": ("/json_body", Reply(content_type="application/json", body=b'{"a": 1}'), "decode_error"),
            "oversized_body": ("/oversized_body", Reply(body=bytes(3 * 2**20), send_length=False), "too_large"),
            "short_jpeg": (
                "/short_jpeg",
                Reply(body=images["jpeg"][:-200], declared_extra=200),
                "truncated_body",
            ),
            "png_without_trailer": (  # decodes, but the server sent less than it declared
                "/png_without_trailer",
                Reply(content_type="image/png", body=images["rgba_png"][:-12], declared_extra=12),
                "truncated_body",
            ),
            "userinfo": ("http://user:secret@{web}/jpeg", None, "invalid_url"),
            "port_out_of_range": ("http://127.0.0.1:99999/jpeg", None, "invalid_url"),
            "space_in_path": ("/a jpeg.jpg", None, "invalid_url"),
            "http_404": ("/http_404", None, "http_404"),
            "http_500": ("/http_500", Reply(500, "text/plain", b"oops"), "http_500"),
            "connection_refused": (f"http://127.0.0.1:{free_port()}/a.jpg", None, "connection_refused"),
            "hang": ("/hang", Reply(body=images["jpeg"], hang_s=60), "timeout"),
            "drip": ("/drip", Reply(body=bytes(5000), drip_s=0.01), "timeout"),
            "redirect_ok": ("/redirect_ok", Reply(302, "text/plain", location="/jpeg"), None),
            **{
                name: (f"/{name}", Reply(body=images["jpeg"], headers=(("X-Robots-Tag", directive),)), reason)
                for name, directive, reason in OPT_OUT_CASES
            },
            "redirect_loop": ("/redirect_loop", Reply(302, "text/plain", location="/redirect_loop"), "redirect_loop"),
            "redirect_to_metadata": (
                "/redirect_to_metadata",
                Reply(302, "text/plain", location="http://169.254.169.254/latest/meta-data/"),
                "url_policy",
            ),
            "redirect_to_internal": (
                "/redirect_to_internal",
                Reply(302, "text/plain", location=f"{internal}/secret.jpg"),
                "url_policy",
            ),
            "redirect_to_file": (
                "/redirect_to_file",
                Reply(302, "text/plain", location="file:///etc/passwd"),
                "url_policy",
            ),
            "redirect_to_ftp": (
                "/redirect_to_ftp",
                Reply(302, "text/plain", location="ftp://127.0.0.1/a.jpg"),
                "url_policy",
            ),
            "internal_direct": (f"{internal}/secret.jpg", None, "url_policy"),
            "metadata_direct": ("http://169.254.169.254/latest/meta-data/", None, "url_policy"),
            "file_scheme": ("file:///etc/passwd", None, "url_policy"),
            "ftp_scheme": ("ftp://example.org/a.jpg", None, "url_policy"),
        }
    )
    return cases


# Captions that must download as they are (UTF-8 repaired): name -> caption bytes in the CSV
BAD_CAPTIONS = {
    "caption_empty": b"",
    "caption_whitespace": b"   \t  ",
    "caption_invalid_utf8": b"caf\xe9 \xff au lait",
    "caption_10kB": b"a red circle " * 800,
    "caption_html": b"<p>a <b>red</b> circle &amp; <script>alert(1)</script>square</p>",
    "caption_control": b"a\x00 red\x07 circle\x1b[31m \xe2\x80\x8bsquare\r\nnext line",
}


def csv_field(raw: bytes) -> bytes:
    return b'"' + raw.replace(b'"', b'""') + b'"'


@dataclass(frozen=True)
class HostileDownload:
    generation: Generation
    rows: dict[str, dict]  # case name -> its manifest row
    expected: dict[str, str | None]
    internal_hits: list[str]
    n_urls: int
