"""Caption stage: the web rows of generation 0 plus K nucleus-sampled synthetic captions per image.

For each shard of the web generation, the target part holds every web row (copied, re-numbered into the
target generation) and, for every image whose download succeeded, up to K synthetic rows (same image
fields, `caption_source="synthetic"`, `model_ref` = the captioner's digest, `caption_backend` and
`caption_prompt` = the backend that wrote it and its prompt). Identical samples of one image are stored
once, since a sample_id names an (image, source, caption) triple. An image that cannot be decoded gets no
synthetic rows and its web row is rejected with `reject_stage="caption"`.

The captioner is any backend of `vlp_core.captioners` (capfilt's BLIP by default; BLIP-2, InstructBLIP,
LLaVA, CoCa), loaded from a local folder; the sampling settings mean the same in each.

Captions are drawn per image from a generator seeded with (seed, image_id), so they do not depend on the
batch an image lands in, and a resumed run writes the same captions as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
import torch

from pipelines import registry
from pipelines.manifests.images import rebased
from pipelines.manifests.manifest import Generation, ManifestError, read_part, sample_id
from pipelines.stages.actors import ImageModelActor
from pipelines.stages.shards import (
    ActorPoolConfig,
    Row,
    check_config,
    image_requests,
    image_seed,
    rejected,
    rows_table,
    run_sharded_inference,
)
from vlp_core.captioners import BACKENDS, Sampling, captioner_transform, check_captioner, load_captioner
from vlp_core.data import PixelTransform
from vlp_core.storage import Location, location

STAGE = registry.CAPTION.name


@dataclass(frozen=True)
class CaptionConfig(ActorPoolConfig):
    """The captioner (a backend and its model folder) and BLIP's CapFilt sampling settings (nucleus
    sampling, top_p 0.9)."""

    checkpoint: Location
    backend: str = "blip"  # one of vlp_core.captioners.BACKENDS
    prompt: str | None = None  # None: the backend's default (BLIP: the checkpoint's own, "a picture of ")
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
                (self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"),
                (location(self.checkpoint).is_dir(), f"checkpoint {self.checkpoint} is not a model folder"),
                *self.sampling.problems(),
            ],
        )
        # a bad or wrong model stops here, before any work
        check_captioner(self.backend, self.checkpoint)

    @property
    def sampling(self) -> Sampling:
        return Sampling(
            self.num_captions, self.top_p, self.temperature, self.min_length, self.max_length, self.repetition_penalty
        )


class CaptionActor(ImageModelActor):
    """Holds one captioner; samples K captions per image, each image with its own seeded draws."""

    output_fields: ClassVar[list[pa.Field]] = [
        pa.field("captions", pa.list_(pa.string())),
        pa.field("prompt", pa.string()),
    ]

    def __init__(self, config: CaptionConfig) -> None:
        self.config = config
        self.captioner = load_captioner(config.backend, config.checkpoint, config.device, config.prompt)
        self.model_ref = self.captioner.model_ref

    @classmethod
    def image_transform(cls, config: CaptionConfig) -> PixelTransform:
        return captioner_transform(config.backend, config.checkpoint)

    def infer(self, pixels: torch.Tensor, requests: list[Row]) -> list[Row]:
        """(B, 3, S, S) -> K captions per image in one batched call; each image draws from a seed made of
        (seed, image_id), so its captions do not depend on its batch."""
        seeds = [image_seed(self.config.seed, request["image_id"]) for request in requests]
        captions = self.captioner.caption(pixels, seeds, self.config.sampling)
        return [{"captions": image_captions, "prompt": self.captioner.prompt} for image_captions in captions]


@dataclass(frozen=True)
class _Captioning:
    config: CaptionConfig
    web: Generation
    target: Generation
    name: ClassVar[str] = STAGE

    def web_rows(self, shard: str) -> list[Row]:
        rows = rebased(read_part(self.web.part_path(shard)).to_pylist(), self.web.path.parent, self.target.path.parent)
        return [
            {**row, "generation": self.target.number, "parent_generation": self.target.number - 1}
            for row in rows
            if row["caption_source"] == "web"
        ]

    def requests(self, shard: str) -> pa.Table:
        return image_requests(shard, [row for row in self.web_rows(shard) if row["kept"] and row["image_ref"]])

    def actor(self) -> type[ImageModelActor]:
        return CaptionActor

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
                rows += _synthetic_rows(web_row, result, self.config.backend)
        synthetic = sum(row["caption_source"] == "synthetic" for row in rows)
        stats = {
            "rows": len(rows),
            "images": len(results),
            "synthetic": synthetic,
            "duplicates_dropped": sum(len(r["captions"] or []) for r in results) - synthetic,
            "decode_failures": sum(bool(r["error_reason"]) for r in results),
            "model_ref": results[0]["model_ref"] if results else None,
            "backend": self.config.backend,
        }
        return rows_table(rows), stats


def _synthetic_rows(web_row: Row, result: Row, backend: str) -> list[Row]:
    """One row per distinct caption of the captioner's `result`, with the web row's image fields."""
    image_fields = ("image_id", "image_ref", "image_sha256", "width", "height", "generation", "parent_generation")
    return [
        {
            **{name: web_row[name] for name in image_fields},
            "caption": caption,
            "caption_source": "synthetic",
            "kept": True,
            "model_ref": result["model_ref"],
            "caption_backend": backend,
            "caption_prompt": result["prompt"],
            "sample_id": sample_id(web_row["image_id"], "synthetic", caption),
        }
        for caption in dict.fromkeys(result["captions"])
    ]


def run_caption(config: CaptionConfig, web: Generation, target: Generation) -> dict[str, Any]:
    """Caption every downloaded image of `web` (generation 0) into `target`, a later generation of its
    dataset or of another dataset under the same root (whose image_refs then point back at `web`'s
    images, `../<dataset>/...`: e.g. the candidates of a second captioner in an ablation); returns the
    target's rows."""
    if web.root != target.root or target.number <= web.number:
        raise ManifestError(
            f"caption: the target {target.path} must be a later generation under the same manifest root as the "
            f"web generation {web.path} (image_refs are relative to its dataset folder)"
        )
    shards = web.shards()
    if not shards:
        raise ManifestError(f"{web.path}: no parts; download the web pairs into it first")
    return run_sharded_inference(_Captioning(config, web, target), target, shards, config)
