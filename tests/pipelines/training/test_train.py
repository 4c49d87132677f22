"""Training stages, tiny models trained for a few steps on a tiny world: in the test process (the local
executor), and on a real local Ray Train cluster for data parallelism and a killed driver.

Every run trains on a fixed set of 8 pairs with batch size 8, so each step sees the same pairs (with
different random crops) and the loss must go down. BLIP runs use the `tiny` preset, or a thinner copy
of it with a 2-batch ITC queue saved as a random-init checkpoint (`micro_checkpoint`): the ITC loss
rises while the queue fills, and a short queue keeps that to the first two steps.
"""

import dataclasses
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipelines.manifests.manifest import Generation, samples_table
from pipelines.progress import listen_to_progress
from pipelines.training.config import TrainConfig
from pipelines.training.data import EpochOrder, coco_triples, derive_seed, write_pairs
from pipelines.training.loop import STATE_FILE, learning_rate, on_device
from pipelines.training.stages import finetune_captioner, finetune_filter, pretrain, train_clip
from pipelines.training.tasks import load_clip_checkpoint
from pipelines.world.generate import WorldConfig, make_world
from vlp_core.blip import BlipModel
from vlp_core.checkpoint import export_hf_filter, import_hf, load_checkpoint, save_checkpoint
from vlp_core.config import CAPTION_PROMPT, load_preset
from vlp_core.tokenizer import train_tokenizer

BATCH = 8
FAST = dict(batch_size=BATCH, lr=1e-3, warmup_steps=1, log_every=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    return make_world(tmp_path_factory.mktemp("world"), WorldConfig(seed=5, n_web=20, n_human=8, n_test=4))


@pytest.fixture(scope="module")
def small_set(world, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A COCO file with 4 human images × 2 captions = 8 pairs (one batch); images stay under human_root."""
    entries = json.loads(world.human_annotations.read_text())[:4]
    path = tmp_path_factory.mktemp("coco") / "small.json"
    path.write_text(json.dumps([{**entry, "caption": entry["caption"][:2]} for entry in entries]))
    return path


@pytest.fixture(scope="module")
def micro_checkpoint(world, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-init tiny BLIP, 2 layers, ITC queue of 2 batches; tokenizer trained on the world's captions."""
    captions = [c for entry in json.loads(world.human_annotations.read_text()) for c in entry["caption"]]
    tiny = load_preset("tiny")
    config = dataclasses.replace(
        tiny,
        queue_size=2 * BATCH,
        vision=dataclasses.replace(tiny.vision, num_layers=2),
        text=dataclasses.replace(tiny.text, num_layers=2),
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("micro") / "checkpoint"
    save_checkpoint(BlipModel(config), train_tokenizer([tiny.prompt, *captions], vocab_size=1024), folder)
    return folder


@pytest.fixture(scope="module")
def generation(world, tmp_path_factory: pytest.TempPathFactory) -> Generation:
    """Gen 1 by hand: 8 kept pairs on human images (absolute paths), a rejected row and an empty caption."""
    entries = json.loads(world.human_annotations.read_text())
    refs = [str(world.human_root / entry["image"]) for entry in entries]
    captions = [entry["caption"][0] for entry in entries]
    generation = Generation(tmp_path_factory.mktemp("manifests"), "world", 1)
    generation.write_part(
        "assemble",
        "00000",
        samples_table(
            {
                "image_id": [entry["image_id"] for entry in entries] + ["rejected", "empty"],
                "image_ref": refs + refs[:2],
                "caption": captions + ["a caption the filter rejected", "  <br> "],
                "caption_source": ["human"] * 8 + ["web", "web"],
                "generation": [1] * 10,
                "kept": [True] * 8 + [False, True],
                "reject_stage": [None] * 8 + ["filter", None],
            }
        ),
        {},
    )
    return generation


def _mean(history: list[dict], key: str, steps: slice) -> float:
    values = [h[key] for h in history[steps]]
    return sum(values) / len(values)


# ----------------------------------------------------------------------------- settings and data


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "either epochs or max_steps"),
        (dict(epochs=1, max_steps=3), "either epochs or max_steps"),
        (dict(max_steps=0), "max_steps must be None or an integer ≥ 1"),
        (dict(max_steps=3, batch_size=0), "batch_size must be an integer ≥ 1"),
        (dict(max_steps=3, lr=0.0), "lr must be a number in"),
        (dict(max_steps=3, preset="huge"), "preset must be one of"),
        (dict(max_steps=3, preset="tiny", init_checkpoint="."), "preset must be None when init_checkpoint"),
        (dict(max_steps=3, tokenizer="."), "tokenizer must be None unless preset"),
        (dict(max_steps=3, init_checkpoint="/no/such/folder"), "init_checkpoint must be an existing folder"),
        (dict(max_steps=3, num_workers=True), "num_workers must be an integer"),
        (dict(max_steps=3, num_workers=2, executor="local"), "num_workers must be 1 with the local executor"),
        (dict(max_steps=3, max_failures=1, executor="local"), "max_failures must be 0 with the local executor"),
        (dict(max_steps=3, executor="slurm"), "executor must be one of"),
    ],
)
def test_config_rejects_bad_values_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, in_process",
    [
        (dict(executor="local"), True),
        (dict(executor="ray"), True),  # one worker: Ray Train would only add its start-up
        (dict(executor="ray", num_workers=2), False),
        (dict(executor="ray", max_failures=1), False),
        (dict(executor="ray", ray_address="127.0.0.1:6379"), False),
    ],
)
def test_a_single_worker_trains_in_this_process_unless_it_joins_a_cluster_or_restarts(kwargs, in_process, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert TrainConfig(max_steps=1, **kwargs).trains_in_process is in_process


def test_a_ray_job_s_single_worker_still_goes_to_its_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what `ray job submit` gives its entrypoint
    assert not TrainConfig(max_steps=1, executor="ray").trains_in_process


def test_a_single_worker_under_ray_trains_without_starting_ray_train(world, small_set, tmp_path):
    result = finetune_captioner(
        TrainConfig(max_steps=2, preset="tiny", executor="ray", **FAST), small_set, world.human_root, tmp_path
    )
    assert result.steps == 2
    assert not (tmp_path / "ray").exists()  # Ray Train's storage_path: never made


class ProgressRecorder:
    """A progress listener that records what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def started(self, description: str, total: int | None, unit: str, done: int) -> str:
        self.events.append(("started", description, total, unit, done))
        return description

    def advanced(self, handle: object, amount: int) -> None:
        self.events.append(("advanced", handle, amount))

    def finished(self, handle: object) -> None:
        self.events.append(("finished", handle))


def test_a_run_in_a_child_process_trains_the_same_model_and_reports_here(world, small_set, tmp_path, caplog):
    config = TrainConfig(max_steps=3, preset="tiny", executor="local", **FAST)
    here = finetune_captioner(config, small_set, world.human_root, tmp_path / "here")
    recorder = ProgressRecorder()
    listen_to_progress(recorder)
    try:
        with caplog.at_level(logging.INFO, logger="pipelines.training"):
            child = finetune_captioner(
                dataclasses.replace(config, child_process=True), small_set, world.human_root, tmp_path / "child"
            )
    finally:
        listen_to_progress(None)
    assert child.losses == here.losses
    assert child.digest == here.digest  # the same weights
    assert "in a child process" in caplog.text
    assert "captioner step 3/3" in caplog.text  # the child's loop logs through this process's loggers
    assert recorder.events == [
        ("started", "captioner", 3, "steps", 0),
        *[("advanced", "captioner", 1)] * 3,
        ("finished", "captioner"),
    ]


def test_a_run_on_two_threads_repeats_itself_and_leaves_torch_as_it_was(world, tmp_path):
    """Batches of 32 (the world's 40 human pairs): smaller ones do not reach torch's multi-threaded sums."""
    config = TrainConfig(max_steps=3, preset="tiny", executor="local", cpus_per_worker=2, batch_size=32, lr=1e-3)
    runs = [finetune_filter(config, world.human_annotations, world.human_root, tmp_path / str(i)) for i in range(2)]
    assert runs[0].losses == runs[1].losses and runs[0].digest == runs[1].digest
    assert not torch.are_deterministic_algorithms_enabled()


def test_entry_points_refuse_a_missing_model_source_or_a_set_smaller_than_a_batch(world, small_set, tmp_path):
    with pytest.raises(ValueError, match="set preset .* or init_checkpoint"):
        finetune_filter(TrainConfig(max_steps=1), small_set, world.human_root, tmp_path)
    with pytest.raises(ValueError, match="train_clip trains config.clip_model from scratch"):
        train_clip(TrainConfig(max_steps=1, preset="tiny"), small_set, world.human_root, tmp_path)
    with pytest.raises(ValueError, match="8 pairs are fewer than one global batch"):
        finetune_filter(
            TrainConfig(max_steps=1, preset="tiny", batch_size=4, num_workers=3, executor="ray"),
            small_set,
            world.human_root,
            tmp_path,
        )


def test_epoch_order_deals_one_shuffle_to_ranks_in_whole_batches():
    ranks = [list(EpochOrder(23, 4, rank, 2, seed=1, epoch=0)) for rank in range(2)]
    assert [len(r) for r in ranks] == [8, 8]  # 23 // 2 // 4 = 2 batches each
    indices = [i for r in ranks for i, _ in r]
    assert len(set(indices)) == 16 and all(0 <= i < 23 for i in indices)
    assert list(EpochOrder(23, 4, 0, 2, seed=1, epoch=0)) == ranks[0]  # reproducible
    assert list(EpochOrder(23, 4, 0, 2, seed=1, epoch=0, start=4)) == ranks[0][4:]  # a resume mid-epoch
    assert [i for i, _ in EpochOrder(23, 4, 0, 2, seed=1, epoch=1)] != [i for i, _ in ranks[0]]
    assert derive_seed(1, 0) != derive_seed(0, 1)


def test_learning_rate_warms_up_then_decays_to_zero():
    rates = [learning_rate(step, 10, 2, 1.0) for step in range(10)]
    assert rates[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))
    assert learning_rate(10, 10, 2, 1.0) == pytest.approx(0.0)


def test_a_batch_meets_the_model_on_the_training_device():
    """The loader makes a batch on the CPU; a worker training in this process on a GPU has no Ray Train
    loader to move it, so the loop does (meta stands for the GPU on a CPU-only machine)."""
    batch = {"pixel_values": torch.zeros(2, 3, 4, 4), "image_index": torch.arange(2), "captions": ["a", "b"]}
    moved = on_device(batch, torch.device("meta"))
    assert {moved["pixel_values"].device.type, moved["image_index"].device.type} == {"meta"}
    assert moved["captions"] == ["a", "b"] and moved["image_index"].dtype == torch.long


def test_coco_pairs_key_images_and_keep_every_caption(world, small_set, tmp_path):
    pairs = list(write_pairs(coco_triples(small_set, world.human_root), tmp_path / "pairs.arrow", "small set"))
    assert len(pairs) == 8 and len({p.image_key for p in pairs}) == 4 and all(p.image_key >= 0 for p in pairs)
    assert all(Path(p.image_ref).is_absolute() and Path(p.image_ref).is_file() for p in pairs)


# ----------------------------------------------------------------------------- training runs


def test_pretrain_learns_from_the_kept_pairs_and_exports_a_loadable_checkpoint(generation, micro_checkpoint, tmp_path):
    config = TrainConfig(init_checkpoint=micro_checkpoint, max_steps=12, checkpoint_every=6, **FAST)
    result = pretrain(config, generation, tmp_path / "run")

    assert result.steps == 12 and len(result.losses) == 12
    assert json.loads((tmp_path / "run" / "run.json").read_text())["pairs"] == 8  # not rejected, not empty
    first, last = result.losses[0], _mean(result.losses, "loss", slice(-3, None))
    assert set(first) == {"step", "loss", "itc_loss", "itm_loss", "itm_accuracy", "lm_loss"}
    assert last < 0.97 * first["loss"]
    assert _mean(result.losses, "lm_loss", slice(-3, None)) < 0.85 * first["lm_loss"]

    model, tokenizer, digest = load_checkpoint(result.checkpoint_dir)
    assert digest == result.digest and model.config.queue_size == 2 * BATCH
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-12", "step-6"]
    assert (tmp_path / "run" / "checkpoints" / "step-6" / STATE_FILE).is_file()

    summary = result.checkpoint_dir / "training.json"
    written = summary.stat().st_mtime_ns
    assert pretrain(config, generation, tmp_path / "run") == result
    assert summary.stat().st_mtime_ns == written  # a finished run is returned, not trained again


def test_each_checkpoint_says_which_prompt_its_decoder_learnt_captions_after(
    generation, micro_checkpoint, world, small_set, tmp_path
):
    """Pretraining's LM has no prompt (BLIP's), so its decoder is sampled without one; a captioner fine-tuned
    from it learns and keeps BLIP's "a picture of "."""
    pretrain_config = TrainConfig(init_checkpoint=micro_checkpoint, max_steps=1, **FAST)
    pretrained = pretrain(pretrain_config, generation, tmp_path / "pretrain")
    assert load_checkpoint(pretrained.checkpoint_dir)[0].config.prompt == ""
    captioner_config = TrainConfig(init_checkpoint=pretrained.checkpoint_dir, max_steps=1, **FAST)
    captioner = finetune_captioner(captioner_config, small_set, world.human_root, tmp_path / "captioner")
    assert load_checkpoint(captioner.checkpoint_dir)[0].config.prompt == CAPTION_PROMPT == "a picture of "


@pytest.mark.slow
def test_a_restarted_run_resumes_from_its_last_checkpoint(world, small_set, tmp_path):
    run_dir = tmp_path / "captioner"
    config = TrainConfig(preset="tiny", max_steps=4, checkpoint_every=2, **FAST)
    first = finetune_captioner(config, small_set, world.human_root, run_dir)
    step_4 = run_dir / "checkpoints" / "step-4" / STATE_FILE
    step_4_written = step_4.stat().st_mtime_ns

    longer = dataclasses.replace(config, max_steps=8)
    second = finetune_captioner(longer, small_set, world.human_root, run_dir)
    assert second.steps == 8 and [h["step"] for h in second.losses] == list(range(1, 9))
    assert second.losses[:4] == first.losses  # steps 1-4 were not trained again
    assert step_4.stat().st_mtime_ns == step_4_written
    assert _mean(second.losses, "lm_loss", slice(-2, None)) < 0.9 * second.losses[0]["lm_loss"]
    assert load_checkpoint(second.checkpoint_dir)[2] == second.digest != first.digest

    with pytest.raises(ValueError, match="config.lr differ"):
        finetune_captioner(dataclasses.replace(longer, lr=5e-4), small_set, world.human_root, run_dir)


@pytest.mark.slow
def test_a_killed_run_resumed_from_a_checkpoint_ends_with_the_same_model(generation, micro_checkpoint, tmp_path):
    """Deterministic under its seed on CPU, and resume restores everything (momentum, queues, RNG, optimizer)."""
    config = TrainConfig(init_checkpoint=micro_checkpoint, max_steps=6, checkpoint_every=3, **FAST)
    whole = pretrain(config, generation, tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / "final")
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "step-6")
    resumed = pretrain(config, generation, tmp_path / "killed")
    assert resumed.digest == whole.digest and resumed.losses == whole.losses


@pytest.mark.slow
def test_finetune_filter_starts_from_a_transformers_folder_and_trains_only_what_it_uses(
    world, small_set, micro_checkpoint, tmp_path
):
    model, tokenizer, _ = load_checkpoint(micro_checkpoint)
    patch_stem = dataclasses.replace(model.config.vision, stem="patch")  # transformers' BLIP has no conv stem
    torch.manual_seed(0)
    export_hf_filter(BlipModel(dataclasses.replace(model.config, vision=patch_stem)), tokenizer, tmp_path / "hf")
    start, _ = import_hf(tmp_path / "hf")
    config = TrainConfig(init_checkpoint=tmp_path / "hf", max_steps=12, checkpoint_every=12, **FAST)
    result = finetune_filter(config, small_set, world.human_root, tmp_path / "run")

    assert set(result.losses[0]) == {"step", "loss", "itc_loss", "itm_loss", "itm_accuracy"}
    # queue full at step 3; the class-balanced ITM loss starts at ln 2 and barely moves in 12 steps
    assert _mean(result.losses, "loss", slice(-3, None)) < 0.92 * result.losses[2]["loss"]
    trained, _, digest = load_checkpoint(result.checkpoint_dir)
    assert digest == result.digest
    assert not torch.equal(trained.itm_head.weight, start.itm_head.weight)
    decoder_attention = [layer.attention.self.query.weight for layer in trained.text_decoder.bert.encoder.layer]
    start_attention = [layer.attention.self.query.weight for layer in start.text_decoder.bert.encoder.layer]
    assert all(torch.equal(a, b) for a, b in zip(decoder_attention, start_attention))  # no LM objective


@pytest.mark.slow
def test_train_clip_learns_and_exports_a_ranker(world, small_set, tmp_path):
    config = TrainConfig(max_steps=10, checkpoint_every=10, **FAST)
    result = train_clip(config, small_set, world.human_root, tmp_path / "run")
    losses = [h["contrastive_loss"] for h in result.losses]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]
    ranker, digest = load_clip_checkpoint(result.checkpoint_dir)
    assert digest == result.digest and ranker.model_name == "clip_tiny"


@pytest.mark.slow
def test_two_workers_pretrain_with_ddp_and_share_the_itc_queue(ray_local, generation, micro_checkpoint, tmp_path):
    config = TrainConfig(
        init_checkpoint=micro_checkpoint,
        max_steps=4,
        checkpoint_every=4,
        num_workers=2,
        executor="ray",
        **{**FAST, "batch_size": BATCH // 2},
    )
    result = pretrain(config, generation, tmp_path / "run")
    assert result.steps == 4
    assert result.losses[-1]["lm_loss"] < result.losses[0]["lm_loss"]
    assert load_checkpoint(result.checkpoint_dir)[2] == result.digest
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-4" / STATE_FILE, weights_only=True)
    queued_ids = state["trainee"]["pretrainer.image_queue._ids"]
    # the last two steps of both ranks (2 × 4 pairs each): every one of the 8 images twice
    assert sorted(Counter(queued_ids.tolist()).values()) == [2] * 8


KILLED_RUN_STEPS = 40  # the worker outlives its killed driver for a moment; it must not finish the run in it


@pytest.mark.slow
def test_a_sigkilled_pretraining_resumes_to_the_uninterrupted_model(
    ray_local, generation, micro_checkpoint, tmp_path, kill_midway
):
    """A real SIGKILL of the driver between checkpoints on Ray Train; the re-run (with the local executor:
    a run resumes wherever it executes) ends with the same model as an uninterrupted run."""
    import ray

    config = TrainConfig(
        init_checkpoint=micro_checkpoint,
        max_steps=KILLED_RUN_STEPS,
        checkpoint_every=2,
        executor="ray",
        ray_address=ray.get_runtime_context().gcs_address,
        **FAST,
    )
    killed = tmp_path / "killed"
    code = (
        "from pathlib import Path\n"
        "from pipelines.manifests.manifest import Generation\n"
        "from pipelines.training.config import TrainConfig\n"
        "from pipelines.training.stages import pretrain\n"
        f"config = TrainConfig(init_checkpoint=Path({str(micro_checkpoint)!r}), max_steps={KILLED_RUN_STEPS}, "
        f"checkpoint_every=2, executor='ray', ray_address={config.ray_address!r}, **{FAST!r})\n"
        f"pretrain(config, Generation(Path({str(generation.root)!r}), 'world', 1), Path({str(killed)!r}))\n"
    )
    steps = [f"step-{step}" for step in range(2, KILLED_RUN_STEPS + 1, 2)]
    kill_midway(
        code,
        generation,
        "pretrain",
        steps,
        finished=lambda step: (killed / "checkpoints" / step / STATE_FILE).is_file(),
    )

    local = dataclasses.replace(config, executor="local")
    resumed = pretrain(local, generation, killed)
    whole = pretrain(local, generation, tmp_path / "whole")
    assert resumed.digest == whole.digest and resumed.losses == whole.losses
