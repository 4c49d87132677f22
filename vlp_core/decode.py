"""Image decoding that survives the web: any bytes in, an upright 8-bit RGB image or a reason out.

Only Pillow and numpy, so the download workers can use it without importing torch.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlp_core.storage import Location, is_remote, location

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000; anything larger is refused before decoding
DECODE_REASONS = ("missing_file", "not_an_image", "truncated", "corrupt", "too_large")


class ImageDecodeError(ValueError):
    """An image that cannot be used. `reason` is one of DECODE_REASONS; `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def load_image(source: str | Location | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a file (a local path or a URI) or encoded bytes into an upright RGB image.

    EXIF orientation is applied; palette, alpha (composited on white), CMYK, 16-bit and animated
    (first frame) images are converted. Raises ImageDecodeError with a reason from DECODE_REASONS.
    """
    if isinstance(source, bytes):
        name, stream = "<bytes>", io.BytesIO(source)
    else:
        path = location(source)
        name, stream = str(path), path
        try:
            if is_remote(path):  # one GET, not a look and then a GET
                stream = io.BytesIO(path.read_bytes())
            elif not path.is_file():
                raise FileNotFoundError(name)
        except (FileNotFoundError, IsADirectoryError):
            raise ImageDecodeError("missing_file", f"no file at {name}") from None
    try:
        with Image.open(stream) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    "too_large", f"{name} is {width}x{height}, above the limit of {max_pixels} pixels"
                )
            image.load()  # the first frame of an animation
            return _to_rgb(ImageOps.exif_transpose(image))
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as error:
        raise ImageDecodeError("not_an_image", f"{name} is not a recognised image format") from error
    except Image.DecompressionBombError as error:
        raise ImageDecodeError("too_large", f"{name}: {error}") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        reason = "truncated" if "truncated" in str(error).lower() or isinstance(error, EOFError) else "corrupt"
        raise ImageDecodeError(reason, f"{name}: {error}") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent pixels become white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    if image.mode.startswith("I"):
        # 16-bit (or wider) grey levels: rescale to 0..255 instead of clipping.
        grey = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")
