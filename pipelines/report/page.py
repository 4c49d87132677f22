"""The report's page: plots, example thumbnails and index.html (a Jinja2 template) in one folder.

Everything the page shows is a relative file next to it, so it opens from disk with no server and no
network; it has no script.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.manifests.images import ImageRefError, ImageStore
from pipelines.manifests.manifest import Generation
from pipelines.report.ablation_table import format_spread
from pipelines.report.plots import SOURCE_COLOURS, write_plots
from vlp_core.atomic import atomic_write_bytes, atomic_write_text

PLOTS_DIR = "plots"
THUMBS_DIR = "thumbs"
THUMB_SIZE = 128


def render_page(figures: dict[str, Any], generation: Generation, folder: Path) -> Path:
    """Write the plots, the thumbnails and index.html into `folder`; returns the page's path."""
    plots = {name: f"{PLOTS_DIR}/{file}" for name, file in write_plots(figures, folder / PLOTS_DIR).items()}
    store = ImageStore(generation.path.parent)
    thumbs = [
        write_thumbnail(store, example["image_ref"], folder / THUMBS_DIR / f"{index:03d}.png")
        for index, example in enumerate(figures["examples"])
    ]
    environment = Environment(
        loader=PackageLoader("pipelines.report", "templates"),
        autoescape=select_autoescape(),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["num"] = format_number
    environment.filters["spread"] = format_spread
    html = environment.get_template("report.html.j2").render(
        f=figures, plots=plots, thumbs=thumbs, colours=SOURCE_COLOURS
    )
    return atomic_write_text(folder / "index.html", html)


def write_thumbnail(store: ImageStore, image_ref: str, path: Path) -> dict[str, str | None]:
    """A THUMB_SIZE PNG of the image; {"src": relative path} or {"error": why it could not be read}."""
    try:
        with Image.open(io.BytesIO(store.read(image_ref))) as image:
            upscale = max(image.size) < THUMB_SIZE  # small images stay crisp, large ones are not aliased
            resample = Image.Resampling.NEAREST if upscale else Image.Resampling.LANCZOS
            thumb = ImageOps.contain(image.convert("RGB"), (THUMB_SIZE, THUMB_SIZE), resample)
    except (ImageRefError, UnidentifiedImageError, OSError) as error:
        return {"src": None, "error": str(error)}
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return {"src": f"{THUMBS_DIR}/{path.name}", "error": None}


def format_number(value: Any, digits: int = 3) -> str:
    """A table cell: '-' for missing, integers as they are, floats with `digits` significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
