"""Caption stage: the web rows of generation 0 plus K nucleus-sampled synthetic captions per image.

For each shard of the web generation, the target part holds every web row (copied, re-numbered into the
target generation) and, for every image whose download succeeded, up to K synthetic rows (same image
fields, `caption_source="synthetic"`, `model_ref` = the captioner's digest). Identical samples of one
image are stored once, since a sample_id names an (image, source, caption) triple. An image that cannot
be decoded gets no synthetic rows and its web row is rejected with `reject_stage="caption"`.

Captions are drawn per image from a generator seeded with (seed, image_id), so they do not depend on the
batch an image lands in, and a resumed run writes the same captions as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import torch

from pipelines import registry
from pipelines.manifests.manifest import Generation, ManifestError, read_part, sample_id
from pipelines.stages.shards import (
    ActorPoolConfig,
    ImageModelActor,
    Row,
    check_config,
    image_requests,
    image_seed,
    rejected,
    rows_table,
    run_sharded_inference,
)
from vlp_core.checkpoint import CAPTIONER_NEEDS, check_checkpoint, load_checkpoint
from vlp_core.data import image_transform
from vlp_core.generation import generate

STAGE = registry.CAPTION.name


@dataclass(frozen=True)
class CaptionConfig(ActorPoolConfig):
    """The captioner checkpoint and BLIP's CapFilt sampling settings (nucleus sampling, top_p 0.9)."""

    checkpoint: Path
    num_captions: int = 10  # K synthetic captions sampled per image
    top_p: float = 0.9
    temperature: float = 1.0
    min_length: int = 5  # caption tokens after the prompt, [SEP] excluded
    max_length: int = 30  # caption tokens after the prompt, [SEP] included
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(
            type(self).__name__,
            [
                (Path(self.checkpoint).is_dir(), f"checkpoint {self.checkpoint} is not a checkpoint folder"),
                (self.num_captions >= 1, f"num_captions must be >= 1, got {self.num_captions}"),
                (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
                (self.temperature > 0.0, f"temperature must be > 0, got {self.temperature}"),
                (self.max_length >= 1, f"max_length must be >= 1, got {self.max_length}"),
                (
                    0 <= self.min_length <= self.max_length,
                    f"min_length must be in [0, max_length={self.max_length}], got {self.min_length}",
                ),
                (self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            ],
        )
        # a bad or wrong model stops here, before any work
        check_checkpoint(self.checkpoint, CAPTIONER_NEEDS, "the caption stage")


class CaptionActor(ImageModelActor):
    """Holds one captioner; samples K captions per image, each image with its own seeded generator."""

    output_fields: ClassVar[list[pa.Field]] = [pa.field("captions", pa.list_(pa.string()))]

    def __init__(self, config: CaptionConfig, dataset_dir: Path) -> None:
        super().__init__(dataset_dir)
        self.config = config
        self.model, self.tokenizer, self.model_ref = load_checkpoint(config.checkpoint, config.device)
        self.transform = image_transform(self.model.config, train=False)

    def infer(self, pixels: torch.Tensor, requests: list[Row]) -> list[Row]:
        """(B, 3, S, S) -> K captions per image in one batched call; each image samples from its own
        generator seeded from (seed, image_id), so its captions do not depend on its batch."""
        c = self.config
        captions = generate(
            self.model,
            self.tokenizer,
            pixels,
            num_captions=c.num_captions,
            method="nucleus",
            top_p=c.top_p,
            temperature=c.temperature,
            min_length=c.min_length,
            max_length=c.max_length,
            repetition_penalty=c.repetition_penalty,
            seeds=[image_seed(c.seed, r["image_id"]) for r in requests],
        )
        return [{"captions": image_captions} for image_captions in captions]


@dataclass(frozen=True)
class _Captioning:
    config: CaptionConfig
    web: Generation
    target: Generation
    name: ClassVar[str] = STAGE

    def web_rows(self, shard: str) -> list[Row]:
        rows = read_part(self.web.part_path(shard)).to_pylist()
        return [
            {**row, "generation": self.target.number, "parent_generation": self.target.number - 1}
            for row in rows
            if row["caption_source"] == "web"
        ]

    def requests(self, shard: str) -> pa.Table:
        return image_requests(shard, [row for row in self.web_rows(shard) if row["kept"] and row["image_ref"]])

    def actor(self) -> tuple[type[ImageModelActor], dict[str, Any]]:
        return CaptionActor, {"config": self.config, "dataset_dir": self.target.path.parent}

    def merge(self, shard: str, results: list[Row]) -> tuple[pa.Table, dict[str, Any]]:
        result_of = {result["image_id"]: result for result in results}
        rows: list[Row] = []
        for web_row in self.web_rows(shard):
            result = result_of.get(web_row["image_id"])
            if result is None:
                rows.append(web_row)
            elif result["error_reason"]:
                rows.append(rejected(web_row, STAGE, result["error_reason"], result["error_detail"]))
            else:
                rows.append(web_row)
                rows += _synthetic_rows(web_row, result["captions"], result["model_ref"])
        synthetic = sum(row["caption_source"] == "synthetic" for row in rows)
        stats = {
            "rows": len(rows),
            "images": len(results),
            "synthetic": synthetic,
            "duplicates_dropped": sum(len(r["captions"] or []) for r in results) - synthetic,
            "decode_failures": sum(bool(r["error_reason"]) for r in results),
            "model_ref": results[0]["model_ref"] if results else None,
        }
        return rows_table(rows), stats


def _synthetic_rows(web_row: Row, captions: list[str], model_ref: str) -> list[Row]:
    """One row per distinct caption, with the web row's image fields."""
    image_fields = ("image_id", "image_ref", "image_sha256", "width", "height", "generation", "parent_generation")
    return [
        {
            **{name: web_row[name] for name in image_fields},
            "caption": caption,
            "caption_source": "synthetic",
            "kept": True,
            "model_ref": model_ref,
            "sample_id": sample_id(web_row["image_id"], "synthetic", caption),
        }
        for caption in dict.fromkeys(captions)
    ]


def run_caption(config: CaptionConfig, web: Generation, target: Generation) -> dict[str, Any]:
    """Caption every downloaded image of `web` (generation 0) into `target`; returns the target's rows."""
    if (Path(web.root), web.dataset) != (Path(target.root), target.dataset) or target.number <= web.number:
        raise ManifestError(
            f"caption: the target {target.path} must be a later generation of the same dataset "
            f"folder as the web generation {web.path} (image_refs are relative to it)"
        )
    shards = web.shards()
    if not shards:
        raise ManifestError(f"{web.path}: no parts; download the web pairs into it first")
    return run_sharded_inference(_Captioning(config, web, target), target, shards, config)
