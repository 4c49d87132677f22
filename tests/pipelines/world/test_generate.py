import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.world.generate import (
    DEFAULT_FAULT_RATES,
    DEFAULT_NOISE_RATES,
    NO_FAULT,
    WorldConfig,
    fault_counts,
    load_scenes,
    load_world,
    make_world,
    rate_counts,
    web_key,
)
from pipelines.world.grammar import NOISY_TYPES, Scene, attribute_accuracy, parse_caption
from vlp_core.data import load_coco_karpathy

SMALL = WorldConfig(seed=7, n_web=60, n_human=6, n_test=4, image_size=48)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    make_world(root, SMALL)
    return root


@pytest.fixture(scope="module")
def truth(world: Path) -> list[dict]:
    return pq.read_table(world / "ground_truth" / "web_noise.parquet").to_pylist()


def test_same_seed_is_byte_identical_and_another_seed_differs(world: Path, tmp_path: Path) -> None:
    make_world(tmp_path / "again", SMALL)
    make_world(tmp_path / "other", WorldConfig(seed=8, n_web=60, n_human=6, n_test=4, image_size=48))
    files, again, other = _files(world), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert len(files) == 1 + 60 + 6 + 4 + 5  # world.json, images, 3 parquet + 2 annotation files
    assert files == again
    assert files.keys() == other.keys()
    assert sum(files[name] != other[name] for name in files) > 60


def test_layout_and_pairs(world: Path, truth: list[dict]) -> None:
    config, paths = load_world(world)
    assert config == SMALL
    pairs = pq.read_table(paths.web_pairs)
    assert pairs.column_names == ["key", "path", "caption"] and pairs.num_rows == 60
    for pair, row in zip(pairs.to_pylist(), truth):
        assert pair["key"] == row["key"]
        folder = "images" if row["fault"] == NO_FAULT else f"fault/{row['fault']}"
        assert pair["path"] == f"{folder}/{pair['key']}.jpg"
        with Image.open(paths.web_images / f"{pair['key']}.jpg") as image:
            assert (image.format, image.size, image.mode) == ("JPEG", (48, 48), "RGB")


def test_realised_counts_match_rates(world: Path, truth: list[dict]) -> None:
    counts = json.loads((world / "world.json").read_text())["counts"]
    realised_noise = {t: sum(r["noise_type"] == t for r in truth) for t in DEFAULT_NOISE_RATES}
    assert (
        realised_noise
        == counts["noise"]
        == {"clean": 30, "partial": 6, "wrong_attribute": 9, "other_image": 9, "boilerplate": 4, "empty": 2}
    )
    realised_faults = {f: sum(r["fault"] == f for r in truth) for f in [*DEFAULT_FAULT_RATES, NO_FAULT]}
    assert realised_faults == counts["fault"] == {"http_404": 1, "corrupt": 1, "html": 1, "slow": 1, "none": 56}


def test_rate_counts_sum_exactly_and_stay_within_one_of_the_rate() -> None:
    for n in (1, 7, 60, 999, 2000):
        counts = rate_counts(DEFAULT_NOISE_RATES, n)
        assert sum(counts.values()) == n
        assert all(abs(counts[t] - rate * n) < 1 for t, rate in DEFAULT_NOISE_RATES.items())


def test_fault_counts_follow_rates_with_one_of_each_from_twenty_pairs() -> None:
    assert fault_counts(DEFAULT_FAULT_RATES, 2000) == {
        "http_404": 20,
        "corrupt": 20,
        "html": 20,
        "slow": 10,
        "none": 1930,
    }
    assert fault_counts(DEFAULT_FAULT_RATES, 20) == {"http_404": 1, "corrupt": 1, "html": 1, "slow": 1, "none": 16}
    assert fault_counts(DEFAULT_FAULT_RATES, 19)["none"] == 19
    assert fault_counts({**DEFAULT_FAULT_RATES, "slow": 0.0}, 100)["slow"] == 0


def test_every_web_caption_behaves_as_its_noise_label_says(world: Path, truth: list[dict]) -> None:
    pairs = pq.read_table(world / "web" / "pairs.parquet").to_pylist()
    captions = {pair["key"]: pair["caption"] for pair in pairs}
    for row in truth:
        scene, caption = Scene.from_json(row["scene"]), captions[row["key"]]
        parsed, accuracy = parse_caption(caption), attribute_accuracy(caption, scene)
        assert attribute_accuracy(row["true_caption"], scene) == 1.0
        if row["noise_type"] in ("clean", "partial"):
            assert accuracy == 1.0, row
        if row["noise_type"] in ("wrong_attribute", "other_image"):
            assert parsed is not None and accuracy < 1.0, row
        if row["noise_type"] == "boilerplate":
            assert caption and parsed is None, row
        if row["noise_type"] == "empty":
            assert caption == "", row
    noisy = [r for r in truth if r["noise_type"] in NOISY_TYPES]
    assert len(noisy) == 9 + 9 + 4 + 2


@pytest.mark.parametrize("split, prefix, n", [("human", "h", 6), ("test", "t", 4)])
def test_coco_sets_are_karpathy_format_with_true_paraphrases(world: Path, split: str, prefix: str, n: int) -> None:
    entries = json.loads((world / split / "annotations.json").read_text())
    scenes = load_scenes(load_world(world)[1])
    assert [e["image_id"] for e in entries] == [f"{prefix}{i:06d}" for i in range(1, n + 1)]
    for entry in entries:
        assert set(entry) == {"image", "caption", "image_id"}
        assert entry["image"] == f"images/{entry['image_id']}.png"
        assert len(entry["caption"]) == 5 and len(set(entry["caption"])) == 5
        assert all(attribute_accuracy(c, scenes[entry["image_id"]]) == 1.0 for c in entry["caption"])
    records = load_coco_karpathy(world / split / "annotations.json", world / split)
    assert len(records) == n and all(r.image_path.is_file() for r in records)


def test_existing_world_is_kept_and_interrupted_one_is_rewritten(world: Path, tmp_path: Path) -> None:
    target = tmp_path / "w"
    make_world(target, SMALL)
    stamp = (target / "world.json").stat().st_mtime_ns
    make_world(target, SMALL)
    assert (target / "world.json").stat().st_mtime_ns == stamp
    (target / "world.json").unlink()
    (target / "web" / "pairs.parquet").unlink()
    (target / ".world-in-progress.json").write_text(json.dumps(SMALL.to_dict()))
    make_world(target, SMALL)
    assert _files(target) == _files(world)


def test_refuses_another_world_or_a_foreign_folder(world: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds another world"):
        make_world(world, WorldConfig(seed=99, n_web=60, n_human=6, n_test=4, image_size=48))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        make_world(tmp_path, SMALL)
    with pytest.raises(ValueError, match="not a synthetic world folder"):
        load_world(tmp_path)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n_web": 0}, r"n_web must be an integer in \[1,"),
        ({"image_size": 16}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"n_human": 2.5}, "n_human"),
        ({"captions_per_image": 0}, "captions_per_image"),
        ({"slow_seconds": -1}, "slow_seconds"),
        ({"noise_rates": {"clean": 0.5, "typo": 0.5}}, r"unknown \['typo'\]; allowed: clean, partial"),
        ({"noise_rates": {"clean": 0.5, "partial": 0.4}}, "must sum to 1, got 0.9"),
        ({"noise_rates": {"clean": 1.5, "empty": -0.5}}, r"must lie in \[0, 1\]"),
        ({"fault_rates": {"html": 0.7, "slow": 0.7}}, "fault_rates must sum to at most 1"),
        ({"fault_rates": {"timeout": 0.1}}, "allowed: http_404, corrupt, html, slow"),
    ],
)
def test_config_validation_names_the_field(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorldConfig(**options)


def test_partial_rate_maps_are_completed_with_zeros() -> None:
    config = WorldConfig(noise_rates={"clean": 1.0}, fault_rates={})
    assert config.noise_rates["empty"] == 0.0 and config.fault_rates == dict.fromkeys(DEFAULT_FAULT_RATES, 0.0)


def test_web_key_reads_the_key_back_from_any_world_url() -> None:
    assert web_key("http://127.0.0.1:8000/images/w000012.jpg") == "w000012"
    assert web_key("http://127.0.0.1:8000/fault/slow/w000013.jpg?x=1") == "w000013"
