"""The synthetic web world: noisy web image-text pairs, a human-annotated set and a test set, truth known.

`make_world(out_dir, config)` writes:

    world.json                        format version, config, realised counts per noise type and fault
    web/pairs.parquet                 key, path (URL path on the world server), caption (the alt-text)
    web/images/<key>.jpg              every web image, faulty URLs included
    ground_truth/web_noise.parquet    key, noise_type, fault, true_caption, scene (json) — evaluation only
    ground_truth/scenes.parquet       image_id, split (human | test), scene (json) — evaluation only
    human/annotations.json + images/  COCO Karpathy format, `captions_per_image` paraphrases per image
    test/annotations.json + images/   the same, held out

Noise types and URL faults are assigned by shuffling a list of labels whose counts match the rates
(largest-remainder rounding), not by coin flips. Every random choice comes from a generator seeded with
(seed, item key), so a world is byte-identical for a given config.

Re-running is safe: a folder that already holds this world is returned untouched; a folder left
half-written by an interrupted run of the same config is rewritten; any other non-empty folder is refused.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from types import MappingProxyType
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from pipelines.world.grammar import NOISE_TYPES, Scene, describe, paraphrases, sample_scene, web_caption
from pipelines.world.render import render_scene
from vlp_core.atomic import atomic_write_bytes, atomic_write_json, atomic_write_parquet
from vlp_core.storage import Location, location, read_parquet

FORMAT_VERSION = 1
DEFAULT_NOISE_RATES = MappingProxyType(
    {"clean": 0.50, "partial": 0.10, "wrong_attribute": 0.15, "other_image": 0.15, "boilerplate": 0.07, "empty": 0.03}
)
FAULT_TYPES = ("http_404", "corrupt", "html", "slow")
NO_FAULT = "none"
DEFAULT_FAULT_RATES = MappingProxyType({"http_404": 0.01, "corrupt": 0.01, "html": 0.01, "slow": 0.005})
MIN_FAULTS_FROM = 20  # with at least this many web pairs, every fault with a rate > 0 occurs at least once
JPEG_QUALITY = 90
MAX_ITEMS = 999_999  # keys have six digits
_IN_PROGRESS = ".world-in-progress.json"


@dataclass(frozen=True)
class WorldConfig:
    """What world to make. Validated on creation; rate maps may leave out types (they get rate 0)."""

    seed: int = 0
    n_web: int = 2000
    n_human: int = 500
    n_test: int = 200
    image_size: int = 64
    noise_rates: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_NOISE_RATES))  # sum to 1
    fault_rates: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_FAULT_RATES))  # sum <= 1
    captions_per_image: int = 5  # human and test sets
    slow_seconds: float = 2.0  # how long a `slow` URL waits before answering

    def __post_init__(self) -> None:
        for name, low, high in (
            ("seed", 0, 2**63 - 1),
            ("n_web", 1, MAX_ITEMS),
            ("n_human", 0, MAX_ITEMS),
            ("n_test", 0, MAX_ITEMS),
            ("image_size", 32, 1024),
            ("captions_per_image", 1, 20),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"WorldConfig.{name} must be an integer in [{low}, {high}], got {value!r}")
        if not isinstance(self.slow_seconds, (int, float)) or not 0 <= self.slow_seconds <= 60:
            raise ValueError(f"WorldConfig.slow_seconds must be a number in [0, 60], got {self.slow_seconds!r}")
        noise = _checked_rates("noise_rates", self.noise_rates, NOISE_TYPES)
        if not math.isclose(sum(noise.values()), 1.0, abs_tol=1e-6):
            raise ValueError(f"WorldConfig.noise_rates must sum to 1, got {sum(noise.values()):.6g} ({noise})")
        faults = _checked_rates("fault_rates", self.fault_rates, FAULT_TYPES)
        if sum(faults.values()) > 1.0 + 1e-9:
            raise ValueError(f"WorldConfig.fault_rates must sum to at most 1, got {sum(faults.values()):.6g}")
        object.__setattr__(self, "noise_rates", noise)
        object.__setattr__(self, "fault_rates", faults)

    def to_dict(self) -> dict:
        return asdict(self)


def _checked_rates(name: str, rates: Mapping[str, float], allowed: tuple[str, ...]) -> dict[str, float]:
    """`rates` with every allowed key present (missing ones are 0), after checking keys and values."""
    unknown = sorted(set(rates) - set(allowed))
    if unknown:
        raise ValueError(f"WorldConfig.{name}: unknown {unknown}; allowed: {', '.join(allowed)}")
    full = {key: float(rates.get(key, 0.0)) for key in allowed}
    bad = {key: rate for key, rate in full.items() if not 0.0 <= rate <= 1.0}
    if bad:
        raise ValueError(f"WorldConfig.{name}: rates must lie in [0, 1], got {bad}")
    return full


@dataclass(frozen=True)
class WorldPaths:
    root: Location
    world_json: Location
    web_pairs: Location
    web_images: Location
    web_noise: Location
    scenes: Location  # the truth of the human and test images
    human_root: Location  # COCO image paths in annotations.json are relative to this folder
    human_annotations: Location
    test_root: Location
    test_annotations: Location

    @classmethod
    def at(cls, root: Location) -> WorldPaths:
        root = location(root)
        return cls(
            root=root,
            world_json=root / "world.json",
            web_pairs=root / "web" / "pairs.parquet",
            web_images=root / "web" / "images",
            web_noise=root / "ground_truth" / "web_noise.parquet",
            scenes=root / "ground_truth" / "scenes.parquet",
            human_root=root / "human",
            human_annotations=root / "human" / "annotations.json",
            test_root=root / "test",
            test_annotations=root / "test" / "annotations.json",
        )


def make_world(out_dir: Location, config: WorldConfig) -> WorldPaths:
    """Write the world described by `config` into `out_dir` (see the module docstring) and return its paths."""
    paths = WorldPaths.at(out_dir)
    if _already_made(paths, config):
        return paths
    atomic_write_json(paths.root / _IN_PROGRESS, config.to_dict())
    noise, faults = _write_web(paths, config)
    human = _write_coco_set(paths.human_root, "h", config.n_human, config)
    test = _write_coco_set(paths.test_root, "t", config.n_test, config)
    atomic_write_parquet(
        pa.table(
            {
                "image_id": list(human) + list(test),
                "split": ["human"] * len(human) + ["test"] * len(test),
                "scene": [scene.to_json() for scene in [*human.values(), *test.values()]],
            }
        ),
        paths.scenes,
    )
    atomic_write_json(
        paths.world_json,
        {
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "counts": {
                "web": config.n_web,
                "human": config.n_human,
                "test": config.n_test,
                "noise": noise,
                "fault": faults,
            },
        },
    )
    (paths.root / _IN_PROGRESS).unlink()
    return paths


def load_world(out_dir: Location) -> tuple[WorldConfig, WorldPaths]:
    """The config and paths of the world in `out_dir`; ValueError if it is not a complete world folder."""
    paths = WorldPaths.at(out_dir)
    info = _read_world_json(paths)
    if info is None:
        raise ValueError(
            f"{out_dir} is not a synthetic world folder (no world.json); make one with `capfilt world --out DIR`"
        )
    return WorldConfig(**info["config"]), paths


def load_scenes(paths: WorldPaths) -> dict[str, Scene]:
    """The true scene of every image of a world, by web key or human/test image id."""
    scenes = {}
    for table_path, id_column in ((paths.web_noise, "key"), (paths.scenes, "image_id")):
        table = read_parquet(table_path, columns=[id_column, "scene"])
        scenes.update(zip(table[id_column].to_pylist(), map(Scene.from_json, table["scene"].to_pylist())))
    return scenes


def web_key(url: str) -> str:
    """The key of the web pair a world-server URL serves ("http://127.0.0.1:8000/fault/slow/w000012.jpg" → "w000012").

    Evaluation uses it to join manifest rows (which keep the URL) with ground_truth/web_noise.parquet.
    """
    return PurePosixPath(urlsplit(url).path).stem


def rate_counts(rates: Mapping[str, float], n: int) -> dict[str, int]:
    """Split `n` items in proportion to `rates`: floors, then the largest remainders get one more each."""
    total = sum(rates.values())
    exact = {key: rate / total * n for key, rate in rates.items()}
    counts = {key: math.floor(value) for key, value in exact.items()}
    by_remainder = sorted(rates, key=lambda key: counts[key] - exact[key])  # stable: ties keep rates' order
    for key in by_remainder[: n - sum(counts.values())]:
        counts[key] += 1
    return counts


def fault_counts(rates: Mapping[str, float], n: int) -> dict[str, int]:
    """URLs per fault type and NO_FAULT, summing to n, by `rate_counts`; when n >= MIN_FAULTS_FROM every
    fault with a rate > 0 gets at least one URL (taken from the largest group)."""
    counts = rate_counts({**rates, NO_FAULT: max(0.0, 1.0 - sum(rates.values()))}, n)
    if n >= MIN_FAULTS_FROM:
        for fault, rate in rates.items():
            if rate > 0 and counts[fault] == 0:
                counts[max(counts, key=counts.get)] -= 1
                counts[fault] = 1
    return counts


def _item_rng(config: WorldConfig, key: str) -> random.Random:
    """The random generator of one item (or one list, e.g. "noise-labels"); independent of every other."""
    return random.Random(f"capfilt-world/{config.seed}/{key}")


def _shuffled_labels(counts: Mapping[str, int], rng: random.Random) -> list[str]:
    """Each label repeated its count times, in random order."""
    labels = [label for label, count in counts.items() for _ in range(count)]
    rng.shuffle(labels)
    return labels


def _write_web(paths: WorldPaths, config: WorldConfig) -> tuple[dict[str, int], dict[str, int]]:
    n = config.n_web
    keys = [f"w{i + 1:06d}" for i in range(n)]
    rngs = [_item_rng(config, key) for key in keys]
    scenes = [sample_scene(rng) for rng in rngs]
    noise_counts, faults_counts = rate_counts(config.noise_rates, n), fault_counts(config.fault_rates, n)
    noise = _shuffled_labels(noise_counts, _item_rng(config, "noise-labels"))
    faults = _shuffled_labels(faults_counts, _item_rng(config, "fault-labels"))
    captions, true_captions = [], []
    for key, rng, scene, noise_type in zip(keys, rngs, scenes, noise):
        captions.append(web_caption(noise_type, scene, scenes, rng))
        true_captions.append(describe(scene, rng))
        image = render_scene(scene, config.image_size, np.random.default_rng(rng.getrandbits(64)))
        atomic_write_bytes(paths.web_images / f"{key}.jpg", _encode(image, "JPEG"))
    url_paths = [
        f"images/{key}.jpg" if fault == NO_FAULT else f"fault/{fault}/{key}.jpg" for key, fault in zip(keys, faults)
    ]
    atomic_write_parquet(pa.table({"key": keys, "path": url_paths, "caption": captions}), paths.web_pairs)
    atomic_write_parquet(
        pa.table(
            {
                "key": keys,
                "noise_type": noise,
                "fault": faults,
                "true_caption": true_captions,
                "scene": [scene.to_json() for scene in scenes],
            }
        ),
        paths.web_noise,
    )
    return noise_counts, faults_counts


def _write_coco_set(root: Location, prefix: str, n: int, config: WorldConfig) -> dict[str, Scene]:
    """n clean images with `captions_per_image` paraphrases each, as COCO Karpathy json + PNG images.

    Returns the scene of each image id."""
    records, scenes = [], {}
    for i in range(n):
        image_id = f"{prefix}{i + 1:06d}"
        rng = _item_rng(config, image_id)
        scene = scenes[image_id] = sample_scene(rng)
        image_path = f"images/{image_id}.png"
        records.append(
            {"image": image_path, "caption": paraphrases(scene, rng, config.captions_per_image), "image_id": image_id}
        )
        image = render_scene(scene, config.image_size, np.random.default_rng(rng.getrandbits(64)))
        atomic_write_bytes(root / image_path, _encode(image, "PNG"))
    atomic_write_json(root / "annotations.json", records)
    return scenes


def _encode(image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **({"quality": JPEG_QUALITY} if image_format == "JPEG" else {}))
    return buffer.getvalue()


def _read_world_json(paths: WorldPaths) -> dict | None:
    if not paths.world_json.is_file():
        return None
    info = json.loads(paths.world_json.read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{paths.world_json}: world format version {info.get('format_version')!r}, this code "
            f"reads version {FORMAT_VERSION}; make the world again"
        )
    return info


def _already_made(paths: WorldPaths, config: WorldConfig) -> bool:
    """True if `paths.root` already holds this exact world, False if it may be (re)written; raises otherwise."""
    marker = paths.root / _IN_PROGRESS
    if marker.is_file():
        if json.loads(marker.read_text()) == config.to_dict():
            return False  # an interrupted run of this same world: write it again
        raise ValueError(f"{paths.root} holds a half-written world with another config; delete the folder")
    info = _read_world_json(paths)
    if info is not None:
        asked = config.to_dict()
        differences = [
            f"{key}={info['config'].get(key)!r}, asked {value!r}"
            for key, value in asked.items()
            if info["config"].get(key) != value
        ]
        if not differences:
            return True
        raise ValueError(
            f"{paths.root} holds another world ({'; '.join(differences)}); choose another folder or delete it"
        )
    if paths.root.exists() and any(paths.root.iterdir()):
        raise ValueError(f"{paths.root} is not empty and holds no world; choose an empty or new folder")
    return False
