"""What runs inside img2dataset's download processes: the URL policy on every connection, bounded
fetches, and the image decoder.

img2dataset fetches with `urllib.request.urlopen` in worker processes it spawns, and urllib follows
redirects there, out of reach of the check `download` makes before it starts. So while
`guarded_downloads(guard)` is active, img2dataset builds a `GuardedDownloader`: its own Downloader,
pickled to each worker with our `FetchGuard`. Before a worker downloads a shard it installs an opener
that
- connects only through `UrlPolicy.connect` (each redirect hop and each DNS answer is checked, and the
  socket goes to the checked address), follows redirects to http(s) only, and ignores proxy settings;
- refuses a body above `max_bytes` or still arriving after `max_seconds`.
Every refusal is an exception whose text starts with a short reason (`url_policy: ...`,
`too_large: ...`), which img2dataset records as the sample's error message.

`SafeResizer` replaces img2dataset's OpenCV resizer, which ignores EXIF orientation, saturates 16-bit
images and allocates whatever size a header declares (up to a gigapixel): downloads are decoded by
the same loader the models use, so an image that downloads is an image that trains.
"""

from __future__ import annotations

import http.client
import importlib
import io
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from img2dataset.downloader import Downloader
from PIL import Image

from pipelines.stages.url_policy import POLICY_REASON, UrlPolicy, UrlPolicyError
from vlp_core.decode import ImageDecodeError, load_image

_READ_CHUNK = 64 * 1024
_PATCH_LOCK = threading.Lock()
_IMG2DATASET_MAIN = importlib.import_module("img2dataset.main")  # the package exports a function of that name


@dataclass(frozen=True)
class FetchGuard:
    """The limits every fetch and decode of a download obeys (picklable: it travels to the workers)."""

    policy: UrlPolicy
    max_bytes: int  # largest response body accepted
    max_seconds: float  # a body still arriving after this many seconds is cut off
    max_pixels: int  # largest declared image (width x height) that is decoded


class _BoundedResponse(http.client.HTTPResponse):
    """An HTTP response whose whole-body read stops at the guard's size and time limits."""

    def __init__(self, sock: Any, *args: Any, guard: FetchGuard, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.guard = guard
        self.deadline = time.monotonic() + guard.max_seconds

    def read(self, amt: int | None = None) -> bytes:
        if amt is not None:
            return super().read(amt)
        if self.length is not None and self.length > self.guard.max_bytes:
            self.close()
            raise OSError(f"too_large: response declares {self.length} bytes, above {self.guard.max_bytes}")
        chunks, size = [], 0
        while chunk := self.read1(_READ_CHUNK):  # one socket read each, so the deadline is checked often
            size += len(chunk)
            if size > self.guard.max_bytes:
                self.close()
                raise OSError(f"too_large: response body above {self.guard.max_bytes} bytes")
            if time.monotonic() > self.deadline:
                self.close()
                raise TimeoutError(f"timed out: body still arriving after {self.guard.max_seconds} s")
            chunks.append(chunk)
        missing = self.length  # http.client counts down the declared length; it is 0 when all came
        self.close()
        if missing:
            raise OSError(f"truncated_body: the connection closed after {size} bytes, {missing} more were declared")
        return b"".join(chunks)


class _GuardedConnection:
    """Mixin for http.client connections: connect through the URL policy, bound the response."""

    def __init__(self, *args: Any, guard: FetchGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = guard.policy.connect  # http.client's own hook for opening the socket
        self.response_class = partial(_BoundedResponse, guard=guard)


class _GuardedHTTPConnection(_GuardedConnection, http.client.HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedConnection, http.client.HTTPSConnection):
    pass


class _GuardedHandler(urllib.request.HTTPSHandler):
    """Opens http and https URLs with the guarded connections."""

    http_request = urllib.request.AbstractHTTPHandler.do_request_

    def __init__(self, guard: FetchGuard) -> None:
        super().__init__()
        self.guard = guard

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(partial(_GuardedHTTPConnection, guard=self.guard), req)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(partial(_GuardedHTTPSConnection, guard=self.guard), req, context=self._context)


class _HttpOnlyRedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib's redirects (loops end after 10 hops) but to http(s) only; urllib itself allows ftp."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        scheme = urlsplit(newurl).scheme
        if scheme not in ("http", "https"):
            raise UrlPolicyError(f"{POLICY_REASON}: redirect to {newurl!r}: scheme {scheme!r} is not http or https")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def guarded_opener(guard: FetchGuard) -> urllib.request.OpenerDirector:
    """A urllib opener for http(s) only, that obeys `guard` on every hop (no proxy, file, ftp or data)."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        _GuardedHandler(guard),
        _HttpOnlyRedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    return opener


@dataclass(frozen=True)
class SafeResizer:
    """Stands in for img2dataset's OpenCV resizer (same call, same result tuple), decoding with the
    loader the models use (vlp_core.decode): an empty body or an image declaring more than
    `max_pixels` is refused before decoding; EXIF orientation, CMYK, 16-bit, alpha and animated images
    become upright 8-bit RGB. Images whose shortest side exceeds `image_size` are shrunk to it
    (img2dataset's keep_ratio, only if bigger) and stored as JPEG."""

    image_size: int
    max_pixels: int
    quality: int = 95

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple:
        """-> (JPEG bytes, width, height, original width, original height, error message)."""
        data = img_stream.getvalue()
        if not data:
            return _failed("empty_body: the response had no bytes")
        try:
            image = load_image(data, self.max_pixels)
        except ImageDecodeError as error:
            return _failed(str(error))  # "<reason>: <detail>"
        original_width, original_height = image.size
        scale = self.image_size / min(image.size)
        if scale < 1:
            size = (max(1, round(original_width * scale)), max(1, round(original_height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        encoded = io.BytesIO()
        image.save(encoded, "JPEG", quality=self.quality)
        return encoded.getvalue(), *image.size, original_width, original_height, None


def _failed(message: str) -> tuple:
    """The resizer's failure result: (image, width, height, original_width, original_height, error)."""
    return None, None, None, None, None, message


class GuardedDownloader(Downloader):
    """img2dataset's Downloader that installs `guard` in the worker process before each shard."""

    def __init__(self, guard: FetchGuard, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.guard = guard
        asked = self.resizer
        if asked.resize_mode.name != "keep_ratio" or not asked.resize_only_if_bigger or self.encode_format != "jpg":
            raise ValueError("GuardedDownloader resizes as keep_ratio, only if bigger, to jpg")
        self.resizer = SafeResizer(asked.image_size, guard.max_pixels)

    def __call__(self, row: Any) -> Any:
        urllib.request.install_opener(guarded_opener(self.guard))  # this worker's urlopen
        return super().__call__(row)


@contextmanager
def guarded_downloads(guard: FetchGuard) -> Iterator[None]:
    """While active, `img2dataset.download` distributes a GuardedDownloader instead of its own."""
    with _PATCH_LOCK:
        original = _IMG2DATASET_MAIN.Downloader
        _IMG2DATASET_MAIN.Downloader = partial(GuardedDownloader, guard)
        try:
            yield
        finally:
            _IMG2DATASET_MAIN.Downloader = original
