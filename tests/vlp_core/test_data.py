"""Tests for vlp_core.data: decoding odd images, transforms, caption cleaning, COCO Karpathy files."""

import io
import json
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlp_core.config import load_preset
from vlp_core.data import (
    CaptionCollator,
    CocoCaptionSet,
    CocoFormatError,
    ImageDecodeError,
    ImageTransform,
    image_transform,
    load_coco_karpathy,
    load_image,
    normalize_caption,
)
from vlp_core.tokenizer import train_tokenizer


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def left_red_right_blue(width: int = 8, height: int = 4) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but carries almost no pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- load_image


def test_alpha_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque
    rgba[0, 1] = (10, 20, 30, 0)  # fully transparent
    rgba[1, 0] = (0, 0, 0, 128)  # half transparent black
    image = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert tuple(pixels[0, 0]) == (10, 20, 30)
    assert tuple(pixels[0, 1]) == (255, 255, 255)
    assert abs(int(pixels[1, 0, 0]) - 127) <= 1


def test_palette_with_transparency_and_grey_alpha():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    decoded = np.asarray(load_image(encode(palette, "PNG", transparency=0)))
    assert decoded.tolist() == [[[255, 255, 255], [0, 255, 0]]]
    grey_alpha = Image.fromarray(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), "LA")
    assert np.asarray(load_image(encode(grey_alpha, "PNG"))).tolist() == [[[50, 50, 50], [255, 255, 255]]]


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    red, green, blue = np.asarray(load_image(encode(cmyk, "JPEG", quality=100)))[4, 4].tolist()
    assert red > 240 and green < 15 and blue < 15


def test_sixteen_bit_grey_is_rescaled_not_clipped():
    levels = np.array([[0, 32896, 65535]], dtype=np.uint16)
    image = load_image(encode(Image.fromarray(levels), "PNG"))
    assert np.asarray(image)[0, :, 0].tolist() == [0, 128, 255]


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (4, 4), color) for color in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    red, green, blue = np.asarray(load_image(data))[0, 0].tolist()
    assert red > 200 and blue < 50


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(left_red_right_blue(8, 4), "JPEG", quality=100, exif=exif.tobytes())
    image = load_image(data)
    pixels = np.asarray(image).astype(int)
    assert image.size == (4, 8)
    assert pixels[0, 2, 0] > 200 and pixels[0, 2, 2] < 50  # the left (red) half is now on top
    assert pixels[7, 2, 2] > 200 and pixels[7, 2, 0] < 50


def test_reads_from_path(tmp_path):
    path = tmp_path / "image.png"
    left_red_right_blue().save(path)
    assert load_image(path).size == (8, 4)
    assert load_image(str(path)).size == (8, 4)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF"])
def test_truncated_images_are_refused(fmt):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    with pytest.raises(ImageDecodeError) as caught:
        load_image(data[: len(data) // 2])
    assert caught.value.reason == "truncated"


@pytest.mark.parametrize("data", [b"<html><body>404 not found</body></html>", b"", b"\x00" * 100])
def test_non_images_are_refused(data):
    with pytest.raises(ImageDecodeError) as caught:
        load_image(data)
    assert caught.value.reason == "not_an_image"


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError) as caught:
        load_image(tmp_path / "nope.jpg")
    assert caught.value.reason == "missing_file"
    assert "nope.jpg" in str(caught.value)


def test_decompression_bombs_are_refused_before_decoding():
    with pytest.raises(ImageDecodeError) as caught:
        load_image(png_header_only(100_000, 100_000))  # 10 gigapixels claimed by a 60-byte file
    assert caught.value.reason == "too_large"
    with pytest.raises(ImageDecodeError) as caught:
        load_image(encode(Image.new("RGB", (20, 20)), "PNG"), max_pixels=399)
    assert caught.value.reason == "too_large"
    assert load_image(encode(Image.new("RGB", (20, 20)), "PNG"), max_pixels=400).size == (20, 20)


# --------------------------------------------------------------------------- ImageTransform


def test_transform_resizes_and_normalises():
    transform = ImageTransform(image_size=16, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    pixels = transform(Image.new("RGB", (40, 30), (255, 0, 51)))
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[:, 5, 5], torch.tensor([1.0, -1.0, 0.2]))


def test_image_transform_follows_the_model_config():
    config = load_preset("tiny")
    evaluation, training = image_transform(config, train=False), image_transform(config, train=True)
    size = config.vision.image_size
    assert (evaluation.image_size, evaluation.mean, evaluation.std) == (size, config.image_mean, config.image_std)
    assert training.train and not evaluation.train
    assert training.min_crop_area == config.min_crop_area
    grey = evaluation(Image.new("RGB", (100, 80), (128, 128, 128)))
    expected = (128 / 255 - torch.tensor(config.image_mean)) / torch.tensor(config.image_std)
    assert grey.shape == (3, size, size)
    torch.testing.assert_close(grey[:, 10, 10], expected)


def test_train_transform_crops_lightly_and_never_flips():
    transform = ImageTransform(image_size=32, mean=(0.0,) * 3, std=(1.0,) * 3, train=True)
    image = left_red_right_blue(64, 64)
    torch.manual_seed(0)
    first = [transform(image) for _ in range(20)]
    torch.manual_seed(0)
    assert all(torch.equal(a, transform(image)) for a in first)  # seeded -> reproducible
    assert not all(torch.equal(first[0], other) for other in first[1:])  # but random
    for pixels in first:
        assert pixels[0, :, 0].min() > 0.9 and pixels[2, :, 0].max() < 0.1  # left edge still red
        assert pixels[2, :, -1].min() > 0.9 and pixels[0, :, -1].max() < 0.1  # right edge still blue


def test_a_min_crop_area_of_one_trains_on_the_whole_image():
    whole = ImageTransform(image_size=32, mean=(0.0,) * 3, std=(1.0,) * 3, train=True, min_crop_area=1.0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    evaluation = replace(whole, train=False)(image)
    assert all(torch.equal(whole(image), evaluation) for _ in range(5))


@pytest.mark.parametrize("width,height", [(64, 64), (200, 10), (3, 90), (1, 1)])
def test_random_crop_box_stays_inside_and_keeps_most_of_the_image(width, height):
    transform = ImageTransform(image_size=8, mean=(0.0,) * 3, std=(1.0,) * 3, train=True)
    torch.manual_seed(1)
    for _ in range(50):
        left, top, right, bottom = transform._random_crop_box(width, height)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert (right - left) * (bottom - top) >= 0.5 * width * height


# --------------------------------------------------------------------------- normalize_caption


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("  a red   circle\n\tnext to a square ", ("a red circle next to a square", None)),
        ("<b>a red</b> circle &amp; a square", ("a red circle & a square", None)),
        ("&lt;i&gt;nested&lt;/i&gt; markup", ("nested markup", None)),
        ("a\x00 red\u200b\x07 circle", ("a red circle", None)),
        ("e\u0301te\u0301", ("\u00e9t\u00e9", None)),
        ("x < y and y > z", ("x < y and y > z", None)),
        ("<!DOCTYPE html><!-- a comment -->a <a href='x'>link</a>", ("a link", None)),
        ("   \n\t ", (None, "empty_caption")),
        ("<p></p>&nbsp;", (None, "empty_caption")),
        (b"caf\xc3\xa9", ("caf\u00e9", None)),
        (b"caf\xe9 au lait", ("caf au lait", "invalid_utf8")),
        (b"\xff\xfe", (None, "empty_caption")),
    ],
)
def test_normalize_caption_examples(raw, expected):
    assert normalize_caption(raw, max_chars=100) == expected


def test_normalize_caption_cuts_at_a_word_boundary():
    assert normalize_caption("a large red circle", max_chars=12) == ("a large red", None)
    assert normalize_caption("a large red circle", max_chars=11) == ("a large red", None)
    assert normalize_caption("supercalifragilistic", max_chars=5) == ("super", None)
    with pytest.raises(ValueError, match="max_chars"):
        normalize_caption("a", max_chars=0)


@settings(max_examples=300, deadline=None)
@given(
    raw=st.one_of(st.text(), st.binary(), st.text(alphabet="<>&;#ltgamp/b x\u0301\x00\n")), max_chars=st.integers(1, 60)
)
def test_normalize_caption_properties(raw, max_chars):
    caption, reason = normalize_caption(raw, max_chars)
    if caption is None:
        assert reason == "empty_caption"
        return
    assert reason in (None, "invalid_utf8")
    assert 0 < len(caption) <= max_chars
    assert caption == caption.strip() and "  " not in caption
    assert not any(not char.isprintable() and char != " " for char in caption)
    assert normalize_caption(caption, max_chars) == (caption, None)  # idempotent


# --------------------------------------------------------------------------- COCO Karpathy


def write_json(path, payload):
    path.write_text(json.dumps(payload))
    return path


def test_load_coco_karpathy_merges_captions_per_image(tmp_path):
    annotations = write_json(
        tmp_path / "train.json",
        [
            {"image": "a.png", "caption": "a red circle", "image_id": 7},
            {"image": "b.png", "caption": ["a blue square", "a square"], "image_id": "b"},
            {"image": "a.png", "caption": "a circle", "image_id": 7},
            {"image": "c.png", "caption": ["a green star"]},
        ],
    )
    records = load_coco_karpathy(annotations, tmp_path / "images")
    assert [(r.image_path.name, r.captions, r.image_id) for r in records] == [
        ("a.png", ("a red circle", "a circle"), "7"),
        ("b.png", ("a blue square", "a square"), "b"),
        ("c.png", ("a green star",), "c.png"),
    ]
    assert records[0].image_path == tmp_path / "images" / "a.png"


@pytest.mark.parametrize(
    "payload,message",
    [
        ({"image": "a.png"}, "expected a JSON list"),
        ([{"image": "a.png", "caption": "x"}, "oops"], "entry 1: expected an object"),
        ([{"caption": "x"}], "entry 0: field 'image'"),
        ([{"image": "a.png", "caption": 3}], "entry 0: field 'caption'"),
        ([{"image": "a.png", "caption": []}], "entry 0: field 'caption'"),
        ([{"image": "a.png", "caption": ["ok", None]}], "entry 0: field 'caption'"),
        ([{"image": "a.png", "caption": "x", "image_id": [1]}], "entry 0: field 'image_id'"),
        (
            [{"image": "a.png", "caption": "x", "image_id": 1}, {"image": "a.png", "caption": "y", "image_id": 2}],
            "entry 1: image 'a.png' has image_id '2'",
        ),
    ],
)
def test_load_coco_karpathy_names_the_bad_entry(tmp_path, payload, message):
    annotations = write_json(tmp_path / "ann.json", payload)
    with pytest.raises(CocoFormatError, match=message) as caught:
        load_coco_karpathy(annotations, tmp_path)
    assert "ann.json" in str(caught.value)


def test_load_coco_karpathy_rejects_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("[{")
    with pytest.raises(CocoFormatError, match="broken.json: not valid JSON"):
        load_coco_karpathy(path, tmp_path)


def test_dataset_and_collate(tmp_path):
    for name, color in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (20, 20), color).save(tmp_path / name)
    annotations = write_json(
        tmp_path / "ann.json",
        [{"image": "a.png", "caption": ["a red square", "red"]}, {"image": "b.png", "caption": "a blue square"}],
    )
    transform = ImageTransform(image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    dataset = CocoCaptionSet(load_coco_karpathy(annotations, tmp_path), transform)
    assert len(dataset) == 3
    assert [dataset[i][1:] for i in range(3)] == [("a red square", 0), ("red", 0), ("a blue square", 1)]

    tokenizer = train_tokenizer(["a red square", "a blue square", "red"] * 5, vocab_size=60)
    batch = CaptionCollator(tokenizer, max_length=6)([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["pixel_values"][2, 2, 0, 0] == pytest.approx(1.0)  # blue image
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 5)  # padded to the longest
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 3, 5]  # [CLS] a red square [SEP] / [CLS] red [SEP]
    assert batch["image_index"].tolist() == [0, 0, 1]
    assert CaptionCollator(tokenizer, max_length=3)([dataset[0]])["input_ids"].shape == (1, 3)
