"""The evaluate stage end to end on a tiny world, with a randomly initialised tiny checkpoint (mechanics:
the numbers of a random model are meaningless, but they must be in range, consistent and written),
and the world metrics against a hand-made generation whose decisions are known."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from device_guard import tensors_made_without_a_device_are_meta

from pipelines.manifests.manifest import Generation, samples_table
from pipelines.report.metrics import reranked_scores, retrieval_recalls, top_k_pairs
from pipelines.stages.evaluate import (
    EVALUATION_FILE,
    EvaluateConfig,
    _text_features,
    encode_and_caption,
    load_test_set,
    run_evaluate,
    score_pairs,
    world_metrics,
)
from pipelines.world.generate import WorldConfig, WorldPaths, make_world
from pipelines.world.grammar import NOISY_TYPES
from vlp_core.blip import BlipModel
from vlp_core.checkpoint import load_checkpoint, save_checkpoint
from vlp_core.config import load_preset
from vlp_core.data import image_transform, load_image
from vlp_core.scoring import score_captions
from vlp_core.tokenizer import train_tokenizer

N_WEB, N_TEST, CAPTIONS_PER_IMAGE = 40, 6, 3


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldPaths:
    return make_world(
        tmp_path_factory.mktemp("world"),
        WorldConfig(seed=2, n_web=N_WEB, n_human=2, n_test=N_TEST, captions_per_image=CAPTIONS_PER_IMAGE),
    )


@pytest.fixture(scope="module")
def checkpoint(world: WorldPaths, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A randomly initialised 2-layer tiny model whose tokenizer knows the world's words."""
    corpus = pq.read_table(world.web_noise)["true_caption"].to_pylist()
    tokenizer = train_tokenizer(corpus * 2, vocab_size=120)
    tiny = load_preset("tiny")
    config = dataclasses.replace(
        tiny,
        vision=dataclasses.replace(tiny.vision, num_layers=2),
        text=dataclasses.replace(tiny.text, vocab_size=len(tokenizer), num_layers=2),
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("checkpoint") / "random-tiny"
    return folder, save_checkpoint(BlipModel(config), tokenizer, folder)


def decision(index: int) -> str:
    """The made-up fate of web pair `index`."""
    if index % 5 == 0:
        return "download" if index % 2 else "caption"  # never reached the filter
    if index % 3 == 0:
        return "filter"
    return "rank" if index % 7 == 0 else "kept"


@pytest.fixture(scope="module")
def generation(world: WorldPaths, tmp_path_factory: pytest.TempPathFactory) -> Generation:
    """Gen 1 with every web pair (fate from `decision`) and, per downloaded image, a true synthetic caption
    (kept) and a vague one (filtered out)."""
    pairs = pq.read_table(world.web_pairs).to_pylist()
    truth = pq.read_table(world.web_noise).to_pylist()
    rows = []
    for index, (pair, true) in enumerate(zip(pairs, truth)):
        image_id, fate = f"web-{index:09d}", decision(index)
        rows.append(
            {
                "image_id": image_id,
                "url": f"http://127.0.0.1:9/{pair['path']}",
                "caption": pair["caption"],
                "caption_source": "web",
                "kept": fate == "kept",
                "reject_stage": None if fate == "kept" else fate,
            }
        )
        if fate not in ("download", "caption"):
            rows.append(
                {
                    "image_id": image_id,
                    "caption": true["true_caption"],
                    "caption_source": "synthetic",
                    "kept": True,
                    "reject_stage": None,
                }
            )
            rows.append(
                {
                    "image_id": image_id,
                    "caption": "a picture",
                    "caption_source": "synthetic",
                    "kept": False,
                    "reject_stage": "filter",
                }
            )
    generation = Generation(tmp_path_factory.mktemp("manifests"), "world", 1)
    columns = {name: [row.get(name) for row in rows] for name in rows[0]}
    generation.write_part("assemble", "00000", samples_table({**columns, "generation": [1] * len(rows)}), {})
    return generation


def test_world_metrics_match_the_known_decisions(world: WorldPaths, generation: Generation) -> None:
    metrics = world_metrics(generation, world, {})
    noise = pq.read_table(world.web_noise)["noise_type"].to_pylist()
    fates = [decision(i) for i in range(N_WEB)]
    screened = [(n, f) for n, f in zip(noise, fates) if f not in ("download", "caption")]
    filtered_noisy = sum(n in NOISY_TYPES and f == "filter" for n, f in screened)
    assert metrics["filter"]["pairs"] == len(screened) == N_WEB - N_WEB // 5
    assert metrics["filter"]["precision"] == pytest.approx(filtered_noisy / sum(f == "filter" for _, f in screened))
    assert metrics["filter"]["recall"] == pytest.approx(filtered_noisy / sum(n in NOISY_TYPES for n, _ in screened))
    removed_noisy = sum(n in NOISY_TYPES and f != "kept" for n, f in screened)
    assert metrics["all_stages"]["recall"] == pytest.approx(removed_noisy / sum(n in NOISY_TYPES for n, _ in screened))
    for noise_type, row in metrics["decisions"].items():
        assert row == {f: sum(n == noise_type and g == f for n, g in zip(noise, fates)) for f in row}
    assert sum(sum(row.values()) for row in metrics["decisions"].values()) == N_WEB
    assert metrics["kept_caption_accuracy"]["synthetic"] == {"n": N_WEB - N_WEB // 5, "mean": 1.0, "fully_correct": 1.0}
    clean_kept = sum(n == "clean" and f == "kept" for n, f in zip(noise, fates))
    assert metrics["kept_caption_accuracy"]["web"]["fully_correct"] >= clean_kept / fates.count("kept")


def test_world_metrics_refuse_a_generation_of_another_world(world: WorldPaths, tmp_path: Path) -> None:
    generation = Generation(tmp_path, "other", 0)
    generation.write_part(
        "download",
        "00000",
        samples_table(
            {
                "image_id": ["web-0"],
                "url": ["http://example.com/images/x999999.jpg"],
                "caption": ["a cat"],
                "caption_source": ["web"],
                "generation": [0],
            }
        ),
        {},
    )
    with pytest.raises(ValueError, match="not pairs of the given world"):
        world_metrics(generation, world, {})


def test_score_pairs_in_slices_equals_full_scoring(world: WorldPaths, checkpoint: tuple[Path, str]) -> None:
    """Scoring the top-k pairs slice by slice, in batches, gives the scores of a full image × text scoring."""
    folder, _ = checkpoint
    config = EvaluateConfig(folder, world.test_annotations, world.test_root, batch_size=2)
    model, tokenizer, _ = load_checkpoint(folder)
    records = load_test_set(config)
    texts = [text for record in records for text in record.captions]
    transform = image_transform(model.config, train=False)
    pixels = torch.stack([transform(load_image(record.image_path)) for record in records])
    full = score_captions(model, tokenizer, pixels, [texts] * len(records))
    full_itm, itc = np.array([s.itm for s in full]), np.array([s.itc for s in full])  # (N, T)

    pairs = top_k_pairs(itc, 2)
    scores = score_pairs(config, 0, pairs[:3]) + score_pairs(config, 3, pairs[3:])
    assert len(scores) == N_TEST
    for image, (texts_of_image, image_scores) in enumerate(zip(pairs, scores)):
        assert np.allclose(image_scores, full_itm[image, texts_of_image], atol=1e-5)


@pytest.mark.usefixtures("ray_local")
def test_run_evaluate_writes_evaluation_json(
    world: WorldPaths, checkpoint: tuple[Path, str], generation: Generation
) -> None:
    folder, digest = checkpoint
    config = EvaluateConfig(
        folder,
        world.test_annotations,
        world.test_root,
        k_test=4,
        num_beams=2,
        max_length=8,
        min_length=2,
        batch_size=4,
        concurrency=2,
        world_dir=world.root,
        executor="ray",
    )
    assert not config.in_process and dataclasses.replace(config, concurrency=1).in_process, "one CPU task runs here"
    results = run_evaluate(config, generation)

    assert json.loads((generation.path / EVALUATION_FILE).read_text()) == json.loads(json.dumps(results))
    assert results["checkpoint"]["digest"] == digest
    assert results["test_set"] == {"images": N_TEST, "texts": N_TEST * CAPTIONS_PER_IMAGE}
    for recalls in (results["retrieval"], results["retrieval_itc"]):
        for direction in ("tr", "ir"):
            r1, r5, r10 = (recalls[f"{direction}@{k}"] for k in (1, 5, 10))
            assert 0.0 <= r1 <= r5 <= r10 <= 1.0
        assert recalls["ir@10"] == 1.0, "only 6 images: every text finds its image among 10"
    assert 0.0 <= results["captioning"]["bleu_4"] <= 1.0 and results["captioning"]["cider"] >= 0.0
    assert [e["image_id"] for e in results["caption_examples"]] == [f"t{i:06d}" for i in range(1, N_TEST + 1)]
    accuracy = results["world"]["test_caption_accuracy"]
    assert accuracy["n"] == N_TEST and 0.0 <= accuracy["mean"] <= 1.0

    # The same numbers in this process, from one task's worth of work (no slicing).
    encoded = encode_and_caption(config)
    assert {e["image_id"]: e["caption"] for e in results["caption_examples"]} == encoded.captions
    pairs = top_k_pairs(encoded.similarity, config.k_test)
    itm = np.full(encoded.similarity.shape, np.nan)
    for image, (texts, scores) in enumerate(zip(pairs, score_pairs(config, 0, pairs))):
        itm[image, texts] = scores
    text_image = [i // CAPTIONS_PER_IMAGE for i in range(N_TEST * CAPTIONS_PER_IMAGE)]
    assert results["retrieval"] == pytest.approx(
        retrieval_recalls(
            reranked_scores(encoded.similarity, itm, 4), reranked_scores(encoded.similarity.T, itm.T, 4), text_image
        )
    )


def test_config_validation_names_the_field(world: WorldPaths, checkpoint: tuple[Path, str], tmp_path: Path) -> None:
    folder, _ = checkpoint
    with pytest.raises(ValueError, match="caption_method must be one of"):
        EvaluateConfig(folder, world.test_annotations, world.test_root, caption_method="nucleus")
    with pytest.raises(ValueError, match="k_test must be >= 1"):
        EvaluateConfig(folder, world.test_annotations, world.test_root, k_test=0)
    with pytest.raises(ValueError, match="checkpoint .* is not a checkpoint folder"):
        EvaluateConfig(tmp_path / "none", world.test_annotations, world.test_root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is not a checkpoint: config.json is missing"):
        EvaluateConfig(tmp_path / "empty", world.test_annotations, world.test_root)  # before any work


def test_test_set_image_ids_must_be_unique(world: WorldPaths, checkpoint: tuple[Path, str], tmp_path: Path) -> None:
    annotations = json.loads(world.test_annotations.read_text())
    annotations[1]["image_id"] = annotations[0]["image_id"]
    duplicated = tmp_path / "test.json"
    duplicated.write_text(json.dumps(annotations))
    config = EvaluateConfig(checkpoint[0], duplicated, world.test_root)
    with pytest.raises(ValueError, match=f"image_id '{annotations[0]['image_id']}' names image .* every image needs"):
        load_test_set(config)


def test_retrieval_features_make_no_tensor_off_the_models_device(checkpoint: tuple[Path, str]) -> None:
    model, tokenizer, _ = load_checkpoint(checkpoint[0])
    texts = ["a red circle", "a small blue square to the left of a circle", "a triangle"]
    expected = _text_features(model, tokenizer, texts, batch_size=2)
    with tensors_made_without_a_device_are_meta():
        features = _text_features(model, tokenizer, texts, batch_size=2)
    torch.testing.assert_close(features, expected)
