"""The model-side loader (vlp_core.decode.load_image) on the same bytes the hostile web serves."""

import numpy as np
import pytest
from hostile_web import image_payloads

from vlp_core.data import ImageDecodeError, load_image


@pytest.mark.parametrize(
    "name, reason",
    [
        ("truncated_jpeg", "truncated"),
        ("empty", "not_an_image"),
        ("html", "not_an_image"),
        ("bomb", "too_large"),
    ],
)
def test_bad_images_raise_a_reason(name: str, reason: str) -> None:
    with pytest.raises(ImageDecodeError) as caught:
        load_image(image_payloads()[name])
    assert caught.value.reason == reason and caught.value.detail


@pytest.mark.parametrize(
    "name, size, corner",
    [
        ("jpeg", (40, 20), (255, 0, 0)),
        ("animated_gif", (30, 10), (255, 0, 0)),  # the first frame
        ("cmyk_jpeg", (16, 8), (255, 0, 0)),
        ("png_16bit", (16, 8), (117, 117, 117)),  # 30000 / 257, not clipped
        ("rgba_png", (20, 10), (255, 255, 255)),  # transparent: composited on white
        ("exif_rotated", (20, 40), (255, 0, 0)),  # upright: turned clockwise, the red left half is on top
    ],
)
def test_odd_but_valid_images_load_as_upright_rgb(name: str, size: tuple[int, int], corner: tuple) -> None:
    image = load_image(image_payloads()[name])
    assert image.mode == "RGB" and image.size == size
    assert np.abs(np.asarray(image, dtype=np.int16)[0, 0] - corner).max() < 40


def test_exif_rotation_puts_the_right_half_at_the_bottom() -> None:
    pixels = np.asarray(load_image(image_payloads()["exif_rotated"]), dtype=np.int16)
    assert np.abs(pixels[-1, 0] - (0, 0, 255)).max() < 40
