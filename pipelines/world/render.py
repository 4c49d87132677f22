"""Draw a synthetic-world scene: flat shapes on a lightly textured background, with PIL.

Shapes are polygons in unit coordinates (data, below), scaled to the object's size and placed at its
position anchor with a little jitter. Drawing happens at 4x and is downsampled, for smooth edges.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from pipelines.world.grammar import POSITION_ANCHORS, Scene

COLOR_RGB = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 50, 170),
    "orange": (245, 135, 20),
}
BACKGROUND_RGB = ((235, 235, 230), (205, 205, 205), (225, 215, 195), (195, 208, 218), (165, 165, 160))
HALF_EXTENT = {"small": 0.09, "large": 0.15}  # half the object's width, as a fraction of the image side
POSITION_JITTER = 0.01  # fraction of the image side; anchors are >= 0.32 apart, two large objects need 0.30
COLOR_JITTER = 12  # per channel, in 0-255 units
TEXTURE_STD = 5.0  # background noise, in 0-255 units
SUPERSAMPLE = 4


def _star(points: int = 5, inner: float = 0.45) -> tuple[tuple[float, float], ...]:
    angles = [-math.pi / 2 + k * math.pi / points for k in range(2 * points)]
    return tuple(
        ((1 if k % 2 == 0 else inner) * math.cos(a), (1 if k % 2 == 0 else inner) * math.sin(a))
        for k, a in enumerate(angles)
    )


def _cross(arm: float = 0.35) -> tuple[tuple[float, float], ...]:
    return (
        (-arm, -1),
        (arm, -1),
        (arm, -arm),
        (1, -arm),
        (1, arm),
        (arm, arm),
        (arm, 1),
        (-arm, 1),
        (-arm, arm),
        (-1, arm),
        (-1, -arm),
        (-arm, -arm),
    )


SHAPE_OUTLINES = {
    "circle": tuple((math.cos(2 * math.pi * k / 48), math.sin(2 * math.pi * k / 48)) for k in range(48)),
    "square": ((-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)),
    "triangle": ((0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)),
    "star": _star(),
    "cross": _cross(),
}


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """An RGB image of `scene`, `size` x `size` pixels; all randomness (jitter, texture) comes from `rng`."""
    canvas = size * SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), BACKGROUND_RGB[int(rng.integers(len(BACKGROUND_RGB)))])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        ax, ay = POSITION_ANCHORS[obj.position]
        cx, cy = (np.array([ax, ay]) + rng.uniform(-POSITION_JITTER, POSITION_JITTER, 2)) * canvas
        radius = HALF_EXTENT[obj.size] * canvas
        color = np.clip(np.array(COLOR_RGB[obj.color]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
        outline = [(cx + radius * x, cy + radius * y) for x, y in SHAPE_OUTLINES[obj.shape]]
        draw.polygon(outline, fill=tuple(int(c) for c in color))
    small = np.asarray(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    texture = rng.normal(0.0, TEXTURE_STD, (size, size, 1))
    return Image.fromarray(np.clip(small + texture, 0, 255).round().astype(np.uint8), "RGB")
