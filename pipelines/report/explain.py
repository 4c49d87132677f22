"""What happened to one sample: its rows in every generation of a dataset, with each decision and reason.

`sample_journey(root, dataset, query)` finds the image a query names (its URL, image id or a sample id of
one of its rows), then reads that image's rows from every generation, part by part. `format_journey`
prints them for people: per generation its lineage line, then one line per candidate caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.manifests.manifest import Generation, ManifestError, list_generations
from vlp_core.storage import Location, location

JOURNEY_COLUMNS = (
    "sample_id",
    "image_id",
    "image_ref",
    "url",
    "caption",
    "caption_source",
    "caption_backend",
    "itm_score",
    "filter_clip_score",
    "clip_score",
    "clip_rank",
    "kept",
    "reject_stage",
    "reject_reason",
    "reject_detail",
)
CAPTION_WIDTH = 70
SCORES = (("itm", "itm_score"), ("filter clip", "filter_clip_score"), ("clip", "clip_score"), ("rank", "clip_rank"))


@dataclass(frozen=True)
class GenerationRows:
    """One generation's lineage (generation.json) and the rows of the image in it."""

    generation: Generation
    info: dict[str, Any]
    rows: list[dict[str, Any]]


def sample_journey(root: Location, dataset: str, query: str) -> list[GenerationRows]:
    """The rows of the image `query` names (a URL, an image id, or a sample id) in every generation of
    `dataset` under `root`, oldest first; generations without it are left out."""
    generations = [g for g in list_generations(location(root)) if g.dataset == dataset]
    if not generations:
        raise ManifestError(f"{location(root) / dataset}: no generations (with a generation.json) to look in")
    images = _images_named(generations, query)
    if not images:
        raise ValueError(f"no row of {location(root) / dataset} has the URL, image id or sample id {query!r}")
    wanted = pa.array(sorted(images), pa.string())
    journey = []
    for generation in generations:
        rows = [
            row
            for part in generation.iter_parts(list(JOURNEY_COLUMNS))
            for row in part.filter(pc.is_in(part["image_id"], wanted)).to_pylist()
        ]
        if rows:
            journey.append(GenerationRows(generation, generation.read_info(), rows))
    return journey


def _images_named(generations: list[Generation], query: str) -> set[str]:
    """The image ids of the rows whose URL, image id or sample id is `query`."""
    for generation in generations:
        found: set[str] = set()
        for part in generation.iter_parts(["sample_id", "image_id", "url"]):
            match = pc.or_kleene(  # a null URL (synthetic and human rows) must not hide a match
                pc.or_kleene(pc.equal(part["url"], query), pc.equal(part["image_id"], query)),
                pc.equal(part["sample_id"], query),
            )
            found.update(part.filter(pc.fill_null(match, False))["image_id"].to_pylist())
        if found:
            return found
    return set()


def format_journey(journey: list[GenerationRows]) -> str:
    """The journey as text: per generation a lineage line, then per candidate caption its source, decision
    (kept, or the stage and reason that rejected it), scores and caption."""
    lines = []
    for entry in journey:
        info = entry.info
        parent = info.get("parent_generation")
        stages = " → ".join(info.get("stages") or [])
        lines.append(
            f"{entry.generation.dataset} gen {entry.generation.number}"
            f"{'' if parent is None else f' (from gen {parent})'}: {stages}"
        )
        first = entry.rows[0]
        lines.append(f"  image {first['image_id']}  {first['url'] or first['image_ref'] or ''}")
        order = {"web": 0, "synthetic": 1, "human": 2}
        for row in sorted(entry.rows, key=lambda r: (order[r["caption_source"]], not r["kept"], r["sample_id"])):
            decision = "kept" if row["kept"] else f"dropped by {row['reject_stage']}: {row['reject_reason']}"
            scores = "  ".join(
                f"{name} {row[column]:.3f}" if isinstance(row[column], float) else f"{name} {row[column]}"
                for name, column in SCORES
                if row[column] is not None
            )
            caption = row["caption"] or ""
            caption = caption if len(caption) <= CAPTION_WIDTH else caption[: CAPTION_WIDTH - 1] + "…"
            source = row["caption_source"] + (f" ({row['caption_backend']})" if row["caption_backend"] else "")
            lines.append(f"  {source:<18} {decision:<40} {scores:<34} {caption!r}")
            if not row["kept"] and row["reject_detail"]:
                lines.append(f"  {'':<18} {row['reject_detail'][:100]}")
    return "\n".join(lines)
