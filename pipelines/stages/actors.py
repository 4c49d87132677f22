"""What the inference stages run in Ray Data: `ImageDecoder` (read, decode and transform each request's image,
in CPU tasks beside GPU actors) and `ImageModelActor` (the model call), with the schemas of what they take and
give. The shard loop that feeds them is `pipelines.stages.shards`."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
import torch

from pipelines.manifests.images import ImageRefError, ImageStore, ShardUnavailableError
from vlp_core.data import ImageDecodeError, PixelTransform, load_image
from vlp_core.storage import Location

log = logging.getLogger(__name__)

SHARD_UNAVAILABLE = "shard_unavailable"  # an actor's result for an image of a lost tar: the stage stops

Row = dict[str, Any]

REQUEST_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("image_ref", pa.string()),
        pa.field("sample_ids", pa.list_(pa.string())),  # the candidate rows the model scores (none for caption)
        pa.field("texts", pa.list_(pa.string())),  # their captions, as the model reads them
    ]
)
ERROR_FIELDS = [
    pa.field("error_reason", pa.string()),  # the image could not be read or decoded (then no outputs)
    pa.field("error_detail", pa.string()),
]
DECODED_SCHEMA = pa.schema(
    [
        *REQUEST_SCHEMA,
        pa.field("pixels", pa.large_binary()),  # the image as the model reads it: float32, C-order, pixel_shape
        pa.field("pixel_shape", pa.list_(pa.int64())),
        *ERROR_FIELDS,
    ]
)
RESULT_FIELDS = [
    *REQUEST_SCHEMA,
    pa.field("model_ref", pa.string()),
    *ERROR_FIELDS,
    pa.field("model_seconds", pa.float64()),  # the image's share of its batch's time in the model (0: not run)
]


@dataclass(frozen=True)
class ImageDecoder:
    """Request blocks -> the same blocks with each image read, decoded and made the model's input by
    `transform` (`pixels`), or the reason it could not be (`error_reason`, `error_detail`).

    With GPU actors it runs in Ray tasks on CPU workers beside them, so the GPUs never wait for JPEG
    decoding; with CPU actors Ray runs it in the actors' own processes (one fused operator)."""

    dataset_dir: Location
    transform: PixelTransform

    def __call__(self, block: pa.Table) -> pa.Table:
        store = _image_store(self.dataset_dir)
        rows = []
        for request in block.to_pylist():
            pixels, reason, detail = None, None, None
            try:
                pixels = self.transform(load_image(store.read(request["image_ref"]))).float().contiguous()
            except ImageDecodeError as error:
                reason, detail = error.reason, error.detail
            except ShardUnavailableError as error:  # the driver stops the stage on it (Ray would lose its type)
                reason, detail = SHARD_UNAVAILABLE, str(error)
            except ImageRefError as error:
                reason, detail = "missing_file", str(error)
            if reason is not None and reason != SHARD_UNAVAILABLE:
                log.warning("cannot use an image (%s): %s", reason, detail)
            rows.append(
                {
                    **request,
                    "pixels": None if pixels is None else pixels.numpy().tobytes(),
                    "pixel_shape": None if pixels is None else list(pixels.shape),
                    "error_reason": reason,
                    "error_detail": detail,
                }
            )
        return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


@functools.lru_cache(maxsize=4)
def _image_store(dataset_dir: Location) -> ImageStore:
    """One store per dataset folder and worker process: a tar shard is indexed once, not once per block."""
    return ImageStore(dataset_dir)


class ImageModelActor:
    """Base of the stages' Ray Data actors: runs `infer` on the images of each decoded block (`ImageDecoder`).
    Subclasses load their model in `__init__(config)` and set `model_ref`; their class method
    `image_transform(config)` says how an image becomes the model's input, without loading the model."""

    output_fields: ClassVar[list[pa.Field]]
    model_ref: str

    @classmethod
    def image_transform(cls, config: Any) -> PixelTransform:
        """PIL image -> (3, S, S) tensor, as the model of `config` reads it."""
        raise NotImplementedError

    def infer(self, pixels: torch.Tensor, requests: list[Row]) -> list[Row]:
        """(N, 3, S, S) images of N requests -> N dicts with the `output_fields`."""
        raise NotImplementedError

    def __call__(self, block: pa.Table) -> pa.Table:
        """A block of `DECODED_SCHEMA` -> one row of `RESULT_FIELDS` + `output_fields` per image."""
        requests = block.drop_columns(["pixels", "pixel_shape"]).to_pylist()
        data, shapes = block["pixels"].to_pylist(), block["pixel_shape"].to_pylist()
        decoded = [index for index, pixels in enumerate(data) if pixels is not None]
        pixels = [_tensor(data[index], shapes[index]) for index in decoded]
        started = time.perf_counter()
        outputs = self._infer_fitting(torch.stack(pixels), [requests[index] for index in decoded]) if decoded else []
        model_seconds = (time.perf_counter() - started) / max(len(decoded), 1)
        output_of = dict(zip(decoded, outputs, strict=True))
        rows = [
            {
                **request,
                **output_of.get(index, {}),
                "model_ref": self.model_ref,
                "model_seconds": model_seconds if index in output_of else 0.0,
            }
            for index, request in enumerate(requests)
        ]
        return pa.Table.from_pylist(rows, schema=pa.schema(RESULT_FIELDS + self.output_fields))

    def _infer_fitting(self, pixels: torch.Tensor, requests: list[Row]) -> list[Row]:
        """`infer`, halving the call while the GPU runs out of memory (a GPU smaller than the default batch
        was chosen for); one image that does not fit is the error it is."""
        try:
            return self.infer(pixels, requests)
        except torch.OutOfMemoryError:
            if len(pixels) == 1:
                raise
            log.warning(
                "out of GPU memory on %d images: splitting the call (a smaller batch avoids it: --batch-size of "
                "the stage commands, --inference-batch-size of run and ablate)",
                len(pixels),
            )
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(pixels) // 2
            return self._infer_fitting(pixels[:half], requests[:half]) + self._infer_fitting(
                pixels[half:], requests[half:]
            )


def _tensor(pixels: bytes, shape: list[int]) -> torch.Tensor:
    """`ImageDecoder`'s bytes -> the (3, S, S) float32 tensor they hold."""
    return torch.frombuffer(bytearray(pixels), dtype=torch.float32).view(shape)
