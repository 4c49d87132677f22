"""Shared fixtures for the inference stage tests: a downloaded web generation and tiny checkpoints.

Downloading and model building happen once per session; each test copies generation 0 into its own
root, so stages write their target generations next to a private copy.
"""

import dataclasses
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import pipelines.stages.shards
from pipelines.manifests.manifest import Generation
from pipelines.stages.download import DownloadConfig, download
from pipelines.world.generate import WorldConfig, WorldPaths, make_world
from pipelines.world.server import WorldServer
from vlp_core.blip import BlipModel
from vlp_core.checkpoint import save_checkpoint
from vlp_core.clip import load_clip, save_clip
from vlp_core.config import load_preset
from vlp_core.data import load_coco_karpathy
from vlp_core.tokenizer import train_tokenizer

WEB_SHARDS = ["00000", "00001", "00002", "00003"]  # the stage world's 40 URLs, 10 per shard
STAGE_WORLD = WorldConfig(seed=5, n_web=40, n_human=40, n_test=20, slow_seconds=0.1)


def copy_dataset(generation: Generation, root: Path) -> Generation:
    """Copy the dataset folder holding `generation` (all its generations) under `root`; returns the copy."""
    shutil.copytree(generation.path.parent, Path(root) / generation.dataset)
    return Generation(Path(root), generation.dataset, generation.number)


@pytest.fixture(scope="session")
def dataset_copier():
    """`copy_dataset` for test modules (which cannot import conftest)."""
    return copy_dataset


@pytest.fixture(scope="session")
def stage_world(tmp_path_factory: pytest.TempPathFactory) -> WorldPaths:
    return make_world(tmp_path_factory.mktemp("stage_world"), STAGE_WORLD)


@pytest.fixture(scope="session")
def downloaded_gen0(tmp_path_factory: pytest.TempPathFactory, stage_world: WorldPaths) -> Generation:
    """Generation 0 of dataset "world": the stage world's 40 web pairs in 4 shards."""
    generation = Generation(tmp_path_factory.mktemp("stage_manifests"), "world", 0)
    with WorldServer(stage_world.root) as server:
        url_list = server.write_url_list(tmp_path_factory.mktemp("stage_urls") / "urls.parquet")
        config = DownloadConfig(samples_per_shard=10, threads=8, allowed_networks=("127.0.0.1/32",))
        download(config, url_list, generation)
    return generation


@pytest.fixture
def web_gen0(tmp_path: Path, downloaded_gen0: Generation) -> Generation:
    """A private copy of generation 0 under this test's tmp_path."""
    return copy_dataset(downloaded_gen0, tmp_path / "manifests")


@pytest.fixture(scope="session")
def tiny_blip_checkpoint(tmp_path_factory: pytest.TempPathFactory, stage_world: WorldPaths) -> Path:
    """A randomly initialised 1-layer BLIP (32 px images) with a tokenizer trained on the world's captions."""
    records = load_coco_karpathy(stage_world.human_annotations, stage_world.human_root)
    tokenizer = train_tokenizer([caption for record in records for caption in record.captions], vocab_size=200)
    tiny = load_preset("tiny")
    config = dataclasses.replace(
        tiny,
        vision=dataclasses.replace(tiny.vision, image_size=32, num_layers=1),
        text=dataclasses.replace(tiny.text, vocab_size=len(tokenizer), num_layers=1),
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoints") / "blip"
    save_checkpoint(BlipModel(config), tokenizer, path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised clip_tiny, saved as safetensors."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoints") / "clip.safetensors"
    save_clip(load_clip("clip_tiny"), path)
    return path


@pytest.fixture
def no_inference(monkeypatch):
    """Make any model inference through the stages' shard loop fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was run")

    monkeypatch.setattr(pipelines.stages.shards, "_map_requests", refuse)


@pytest.fixture
def kill_midway():
    """Run Python `code` in a subprocess and SIGKILL it (with any process it started) once at least one
    of `shards` is finished and not all of them; returns the shards that were done at the kill. A shard
    is finished when `stage` marked it in `target`, or when `finished(shard)` says so."""

    def run(
        code: str, target: Generation, stage: str, shards: list[str], finished: Callable[[str], bool] | None = None
    ) -> list[str]:
        is_finished = finished or (lambda shard: target.is_done(stage, shard))

        def done() -> list[str]:
            return [shard for shard in shards if is_finished(shard)]

        process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        try:
            while not done():
                if process.poll() is not None:
                    raise AssertionError(f"the {stage} run exited ({process.returncode}) before finishing a shard")
                time.sleep(0.01)  # polling interval only; nothing is asserted on timing
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        cut = done()
        assert 0 < len(cut) < len(shards), f"killed with {cut} done; the test needs a run cut midway"
        return cut

    return run


@pytest.fixture
def resumes_like_uninterrupted(tmp_path: Path, kill_midway) -> Callable:
    """`check(run, config, scored)` for a scoring stage (`run_filter`, `run_rank`): a subprocess runs
    `run(config, target)` on a copy of `scored`'s dataset and is SIGKILLed midway; one finished shard
    loses its marker (as if killed between a part's rename and its marker) and the run is resumed here.
    The result must hold every sample once and equal an uninterrupted run on another copy."""

    def check(run: Callable, config, scored: Generation) -> None:
        stage = importlib.import_module(run.__module__).STAGE
        killed = copy_dataset(scored, tmp_path / "killed")
        settings = json.loads(json.dumps(dataclasses.asdict(config), default=str))
        config_class = type(config).__name__
        code = (
            "import json; from pathlib import Path\n"
            f"from {run.__module__} import {config_class}, {run.__name__}\n"
            "from pipelines.manifests.manifest import Generation\n"
            f"{run.__name__}({config_class}(**json.loads({json.dumps(settings)!r})), "
            f"Generation(Path({str(killed.root)!r}), {scored.dataset!r}, {scored.number}))\n"
        )
        finished = kill_midway(code, killed, stage, WEB_SHARDS)
        killed.marker_path(stage, finished[0]).unlink()

        other = copy_dataset(scored, tmp_path / "uninterrupted")
        run(config, killed)
        run(config, other)
        resumed, uninterrupted = killed.read_samples(), other.read_samples()
        assert len(set(resumed["sample_id"].to_pylist())) == resumed.num_rows
        assert resumed.to_pylist() == uninterrupted.to_pylist()

    return check
