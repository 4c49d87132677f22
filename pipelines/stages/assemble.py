"""Assemble stage: add the human-annotated pairs to a generation and write its lineage record.

CapFilt's new dataset is the filtered web and synthetic pairs plus the human-annotated ones (BLIP §3.3).
This stage writes the human pairs as `samples/part-human.parquet` (one row per caption, `image_ref` the
absolute image path) and then `generation.json` (parent, stages, checkpoint digests, config digest,
counts). The human set is small and needs no model, so it is read in-process, without Ray.

A human image that cannot be decoded, or a blank caption, is kept in the manifest as a rejected row
(`reject_stage="assemble"`, reason from `vlp_core.data.DECODE_REASONS` or `empty_caption`), never
dropped silently and never counted as kept.
Resume: part-human has a completion marker; a re-run rewrites only generation.json (so, after a
re-threshold and re-rank, it refreshes the counts).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipelines import registry
from pipelines.manifests.manifest import Generation, ManifestError, generation_info, samples_table
from vlp_core.data import CaptionRecord, ImageDecodeError, load_coco_karpathy, load_image
from vlp_core.storage import Location, absolute, location

log = logging.getLogger(__name__)

STAGE = registry.ASSEMBLE.name
HUMAN_SHARD = "human"
HUMAN_ID_PREFIX = "human-"


@dataclass(frozen=True)
class AssembleConfig:
    """Where the human-annotated pairs are: a COCO Karpathy json and the folder its image paths are under."""

    human_annotations: Location
    human_image_root: Location

    def __post_init__(self) -> None:
        if not location(self.human_annotations).is_file():
            raise ValueError(
                f"assemble config: human_annotations {self.human_annotations} is not a file; "
                "pass a COCO Karpathy json ([{'image', 'caption', 'image_id'}, ...])"
            )
        if not location(self.human_image_root).is_dir():
            raise ValueError(
                f"assemble config: human_image_root {self.human_image_root} is not a folder; pass the "
                "folder the annotation's image paths are relative to"
            )


def run_assemble(
    config: AssembleConfig,
    target: Generation,
    parent: int,
    checkpoints: Mapping[str, str],
    stages: list[str],
    config_digest: str,
    flow_run_id: str | None = None,
) -> dict[str, Any]:
    """Add part-human to `target` (built from generation `parent`) and write its generation.json.

    `stages` are the stages that built `target` before this one ("assemble" is appended);
    `checkpoints` maps a role (captioner, filter, clip, pretrained) to its checkpoint digest.
    Returns the generation's `generation_counts`.
    """
    with target.writer(STAGE):
        bad = {role: digest for role, digest in checkpoints.items() if not isinstance(digest, str) or not digest}
        if bad:
            raise ValueError(f"assemble: checkpoints need a non-empty digest string per role, got {bad}")
        _check_stages_finished(target, stages)
        if not target.is_done(STAGE, HUMAN_SHARD):
            records = load_coco_karpathy(config.human_annotations, config.human_image_root)  # validates before writing
            human = human_rows(records, target.number, parent)
            target.write_part(
                STAGE,
                HUMAN_SHARD,
                human,
                {"rows": human.num_rows, "images": len(records), "kept": sum(human["kept"].to_pylist())},
            )
            log.info("assemble: %d human captions of %d images into %s", human.num_rows, len(records), target.path)

        counts = target.counts()
        target.write_info(
            generation_info(
                counts,
                dataset=target.dataset,
                number=target.number,
                parent=parent,
                stages=[*stages, STAGE] if STAGE not in stages else list(stages),
                config_digest=config_digest,
                checkpoints=checkpoints,
                flow_run_id=flow_run_id,
                inputs={
                    "human_annotations": str(absolute(location(config.human_annotations))),
                    "human_image_root": str(absolute(location(config.human_image_root))),
                },
            )
        )
        return counts


def _check_stages_finished(target: Generation, stages: list[str]) -> None:
    """Every candidate shard of `target` (all but part-human) must carry the marker of every stage."""
    shards = [shard for shard in target.shards() if shard != HUMAN_SHARD]
    if not shards:
        raise ManifestError(
            f"assemble: {target.path} has no candidate parts; run the caption, filter and rank stages into it first"
        )
    for stage in stages:
        unfinished = [shard for shard in shards if not target.is_done(stage, shard)]
        if unfinished:
            raise ManifestError(
                f"assemble: the {stage} stage has not finished shard(s) {unfinished} of "
                f"{target.path}; run it to completion first"
            )


def human_rows(records: list[CaptionRecord], generation: int, parent: int) -> pa.Table:
    """One manifest row per distinct caption of every record (a sample_id names an (image, source, caption)
    triple, so a repeated caption is stored once); size and sha256 come from the image file. A row whose
    image does not decode, or whose caption is blank, is stored rejected with its reason."""
    columns: dict[str, list] = {
        name: []
        for name in (
            "image_id",
            "image_ref",
            "image_sha256",
            "width",
            "height",
            "caption",
            "kept",
            "reject_stage",
            "reject_reason",
            "reject_detail",
        )
    }
    for record in records:
        image_path = absolute(record.image_path)
        image_ref, facts = str(image_path), _image_facts(image_path)
        for caption in dict.fromkeys(record.captions):
            columns["image_id"].append(HUMAN_ID_PREFIX + record.image_id)
            columns["image_ref"].append(image_ref)
            columns["caption"].append(caption)
            empty = facts["kept"] and not caption.strip()
            for name, value in (facts | EMPTY_CAPTION if empty else facts).items():
                columns[name].append(value)
    n_rows = len(columns["image_id"])
    return samples_table(
        {
            **columns,
            "caption_source": ["human"] * n_rows,
            "generation": [generation] * n_rows,
            "parent_generation": [parent] * n_rows,
        }
    )


EMPTY_CAPTION = {"kept": False, "reject_stage": STAGE, "reject_reason": "empty_caption", "reject_detail": None}


def _image_facts(path: Location) -> dict[str, object]:
    """sha256, width and height of a usable image; a rejected row's fields for an unusable one."""
    try:
        width, height = load_image(path).size
    except ImageDecodeError as error:
        log.warning("assemble: human image %s rejected (%s)", path, error)
        return {
            "image_sha256": None,
            "width": None,
            "height": None,
            "kept": False,
            "reject_stage": STAGE,
            "reject_reason": error.reason,
            "reject_detail": error.detail,
        }
    return {
        "image_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "width": width,
        "height": height,
        "kept": True,
        "reject_stage": None,
        "reject_reason": None,
        "reject_detail": None,
    }
