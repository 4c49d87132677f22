"""Where the shard loop's work runs under Ray: images are decoded in CPU tasks beside actors that hold a GPU,
in the actors' own processes when they run on the CPU, and a single CPU actor runs in this process (the
session's Ray declares one GPU; no CUDA runs)."""

import io
import os
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image
from ray import cloudpickle

from pipelines.manifests.manifest import Generation
from pipelines.stages.actors import ImageModelActor
from pipelines.stages.shards import ActorPoolConfig, _map_requests, image_requests

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module


def _process_id_pixels(image: Image.Image) -> torch.Tensor:
    """A stand-in transform whose one pixel is the id of the process that decoded the image."""
    return torch.full((1, 1, 1), float(os.getpid()))


class _WhereActor(ImageModelActor):
    """A stand-in model that says where each image was decoded and where the model ran."""

    output_fields = [pa.field("decoded_in", pa.int64()), pa.field("model_in", pa.int64())]

    def __init__(self, config: ActorPoolConfig) -> None:
        self.model_ref = "test:where"

    @classmethod
    def image_transform(cls, config: ActorPoolConfig):
        return _process_id_pixels

    def infer(self, pixels, requests):
        return [{"decoded_in": int(image.item()), "model_in": os.getpid()} for image in pixels]


class _Stage:
    name = "caption"

    def actor(self) -> type[ImageModelActor]:
        return _WhereActor


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize(
    "num_gpus, concurrency, where",
    [(0, 2, "in the actors"), (1, 1, "beside the actors"), (0, 1, "in this process")],
)
def test_decoding_runs_beside_gpu_actors_inside_cpu_ones_and_one_cpu_actor_runs_here(
    num_gpus: float, concurrency: int, where: str, tmp_path: Path
) -> None:
    """GPU actors never decode; CPU actors decode their own blocks; a single CPU actor, which Ray would only
    slow down, runs in this process, decoding included (`ActorPoolConfig.in_process`)."""
    target = Generation(tmp_path, "web", 1)
    target.path.parent.mkdir(parents=True)
    for index in range(6):
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4), (index, 0, 0)).save(buffer, format="PNG")
        (target.path.parent / f"{index}.png").write_bytes(buffer.getvalue())
    rows = [{"image_id": str(index), "image_ref": f"{index}.png", "sample_id": str(index)} for index in range(6)]
    pool = ActorPoolConfig(batch_size=2, num_gpus=num_gpus, concurrency=concurrency, executor="ray")
    assert pool.in_process is (where == "in this process")
    results = list(_map_requests(_Stage(), target, [image_requests("00000", rows, ["a caption"] * 6)], pool))
    assert sorted(result["image_id"] for result in results) == [str(index) for index in range(6)]
    assert not any(result["error_reason"] for result in results)
    model_in = {result["model_in"] for result in results}
    decoded_in = {result["decoded_in"] for result in results}
    if where == "in this process":
        assert model_in == decoded_in == {os.getpid()}
        return
    elsewhere = [result["decoded_in"] != result["model_in"] for result in results]
    assert elsewhere == [where == "beside the actors"] * 6
    assert os.getpid() not in model_in | decoded_in, "nothing is decoded or modelled in the driver"
