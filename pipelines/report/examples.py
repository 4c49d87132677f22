"""The report's examples: a few web images with every caption they got and each caption's fate.

`examples(generation)` picks them in two passes over the parts (a bounded choice, then the chosen images'
rows), so a generation of any size is never held in memory.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.manifests.manifest import Generation

N_EXAMPLES = 12
N_EXTREMES = 2  # highest- and lowest-scoring images shown first among the examples

EXAMPLE_SOURCES = ("web", "synthetic")


def examples(generation: Generation, n: int = N_EXAMPLES) -> list[dict[str, Any]]:
    """Up to `n` web images with all their captions: the N_EXTREMES highest and lowest by best ITM
    score, then the others in the order of a hash of their image id (deterministic, unbiased). Two passes:
    the choice (bounded candidate lists), then the chosen images' rows."""
    highest: list[tuple[float, str]] = []  # (-best score, image): the smallest N_EXTREMES
    lowest: list[tuple[float, str]] = []  # the largest N_EXTREMES
    by_hash: list[tuple[str, str]] = []  # (sha256 of the image id, image): the smallest n + 2 N_EXTREMES
    for part in generation.iter_parts(["image_id", "image_ref", "caption_source", "itm_score"]):
        candidates = part.filter(pc.is_in(part["caption_source"], pa.array(EXAMPLE_SOURCES)))
        candidates = candidates.filter(pc.invert(pc.is_null(candidates["image_ref"])))
        images = candidates.group_by("image_id").aggregate([("itm_score", "max")]).to_pylist()
        scored = [(-row["itm_score_max"], row["image_id"]) for row in images if row["itm_score_max"] is not None]
        highest = heapq.nsmallest(N_EXTREMES, [*highest, *scored])
        lowest = heapq.nlargest(N_EXTREMES, [*lowest, *scored])
        hashed = [(hashlib.sha256(row["image_id"].encode()).hexdigest(), row["image_id"]) for row in images]
        by_hash = heapq.nsmallest(n + 2 * N_EXTREMES, [*by_hash, *hashed])
    roles = {image: "highest" for _, image in highest}
    roles.update({image: "lowest" for _, image in sorted(lowest) if image not in roles})
    picked = [*roles, *(image for _, image in by_hash if image not in roles)][:n]
    by_image = _example_rows(generation, picked)
    return [
        {
            "image_id": image,
            "image_ref": by_image[image][0]["image_ref"],
            "role": roles.get(image, "sampled"),
            "best_itm_score": max(
                (r["itm_score"] for r in by_image[image] if r["itm_score"] is not None), default=None
            ),
            "captions": [
                _caption_entry(row)
                for row in sorted(
                    by_image[image],
                    key=lambda r: (
                        r["caption_source"] != "web",
                        not r["kept"],
                        -(r["itm_score"] or 0.0),
                        r["sample_id"],
                    ),
                )
            ],
        }
        for image in picked
    ]


def _example_rows(generation: Generation, images: list[str]) -> dict[str, list[dict]]:
    """The web and synthetic rows (with an image) of `images`, in part order."""
    by_image: dict[str, list[dict]] = defaultdict(list)
    wanted = pa.array(images, pa.string())
    for part in generation.iter_parts(["image_id", "image_ref", "sample_id", *CAPTION_ENTRY_KEYS]):
        rows = part.filter(pc.is_in(part["image_id"], wanted))
        rows = rows.filter(pc.is_in(rows["caption_source"], pa.array(EXAMPLE_SOURCES)))
        for row in rows.filter(pc.invert(pc.is_null(rows["image_ref"]))).to_pylist():
            by_image[row["image_id"]].append(row)
    return by_image


CAPTION_ENTRY_KEYS = (
    "caption_source",
    "caption",
    "kept",
    "reject_stage",
    "reject_reason",
    "itm_score",
    "clip_score",
    "clip_rank",
)


def _caption_entry(row: dict) -> dict[str, Any]:
    return {key: row[key] for key in CAPTION_ENTRY_KEYS}
