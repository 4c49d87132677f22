import itertools

import numpy as np
import pytest

from pipelines.world.grammar import COLORS, POSITION_ANCHORS, POSITIONS, SHAPES, Scene, SceneObject
from pipelines.world.render import BACKGROUND_RGB, COLOR_RGB, render_scene

SIZE = 64


def _pixels(scene: Scene, seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.asarray(render_scene(scene, size, np.random.default_rng(seed)), dtype=np.int32)


def _mask(pixels: np.ndarray, color: str) -> np.ndarray:
    return np.abs(pixels - np.array(COLOR_RGB[color])).sum(axis=-1) < 60


@pytest.mark.parametrize("position, color", zip(POSITIONS, COLORS))
def test_object_color_sits_at_its_anchor_and_corners_show_background(position: str, color: str) -> None:
    pixels = _pixels(Scene((SceneObject("square", color, "large", position),)))
    x, y = (round(f * SIZE) for f in POSITION_ANCHORS[position])
    assert _mask(pixels, color)[y, x]
    corner = pixels[1, 1] if position != "left" else pixels[1, -2]
    assert min(np.abs(corner - np.array(bg)).max() for bg in BACKGROUND_RGB) < 25


def test_large_objects_cover_about_three_times_the_area_of_small_ones() -> None:
    areas = {
        size: _mask(_pixels(Scene((SceneObject("circle", "blue", size, "center"),))), "blue").sum()
        for size in ("small", "large")
    }
    assert 2.2 < areas["large"] / areas["small"] < 3.4  # (0.15 / 0.09)^2 = 2.8


def test_shapes_are_distinguishable() -> None:
    masks = {shape: _mask(_pixels(Scene((SceneObject(shape, "red", "large", "center"),))), "red") for shape in SHAPES}
    for a, b in itertools.combinations(SHAPES, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.85, (a, b, iou)


def test_neighbouring_large_objects_do_not_overlap_and_rendering_is_deterministic() -> None:
    scene = Scene(
        (
            SceneObject("circle", "yellow", "large", "left"),
            SceneObject("cross", "green", "large", "center"),
            SceneObject("square", "purple", "large", "top"),
        )
    )
    pixels = _pixels(scene, seed=3)
    for obj in scene.objects:
        alone = _mask(_pixels(Scene((obj,)), seed=3), obj.color).sum()
        assert abs(_mask(pixels, obj.color).sum() - alone) <= 0.1 * alone, obj
    assert np.array_equal(pixels, _pixels(scene, seed=3))
    assert not np.array_equal(pixels, _pixels(scene, seed=4))
    assert _pixels(scene, size=40).shape == (40, 40, 3)
