"""Evaluate stage: a checkpoint on a held-out COCO-format set, and a generation's data against the world's truth.

Model metrics (any COCO Karpathy-format test set):
- retrieval TR@1/5/10 and IR@1/5/10 with BLIP's protocol: ITC similarity of every image × text, then the
  `k_test` best candidates of every query re-scored with ITM (`metrics.reranked_scores`); ITC-only
  recalls are reported too, so the re-rank's effect is visible;
- captioning BLEU-4 and CIDEr-D of one greedy or beam-search caption per image (pycocoevalcap scorers
  with `metrics.simple_tokenize`, as the PTB tokenizer needs Java).

World metrics (`world_dir` given): attribute accuracy of those captions against the test scenes; the
generation's web rows joined to `ground_truth/web_noise.parquet` give the filter's precision/recall per
noise type and a noise type × decision table; the kept captions' attribute accuracy per source says how
clean the bootstrapped dataset is.

Ray: the model work runs in Ray tasks (each loads the checkpoint once, with `num_gpus` from the config),
so a driver without a GPU can evaluate on a cluster's GPU nodes; the local executor, or a single CPU task
without a cluster (`EvaluateConfig.in_process`), calls the same functions in this process. One task
encodes every image and text (the similarity matrix must be whole to rank) and captions the images; the
ITM re-rank, which costs about 20x more (k_test pairs per image and per text), is split by image over
`concurrency` tasks.
Results are written atomically to `<generation>/evaluation.json` (or a given file) and returned.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray
import torch
from transformers import PreTrainedTokenizerBase

from pipelines.executor import init_ray
from pipelines.manifests.manifest import Generation
from pipelines.progress import progress
from pipelines.registry import UNSCREENED_STAGES
from pipelines.report.metrics import (
    WEB_DECISION_COLUMNS,
    AccuracyTally,
    attribute_accuracy_summary,
    caption_scores,
    decision_metrics,
    reranked_scores,
    retrieval_recalls,
    top_k_pairs,
    web_decisions,
)
from pipelines.stages.filter import STAGE as FILTER_STAGE
from pipelines.stages.shards import ActorPoolConfig, check_config
from pipelines.world.generate import WorldPaths, load_scenes, load_world, web_key
from vlp_core.atomic import atomic_write_json
from vlp_core.blip import BlipModel
from vlp_core.checkpoint import CAPTIONER_NEEDS, FILTER_NEEDS, check_checkpoint, load_checkpoint, random_parts
from vlp_core.data import CaptionRecord, ImageTransform, image_transform, load_coco_karpathy, load_image
from vlp_core.generation import generate
from vlp_core.inference import inference_mode
from vlp_core.scoring import score_captions
from vlp_core.storage import Location, absolute, location, read_parquet
from vlp_core.tokenizer import tokenize

log = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"
CAPTION_METHODS = ("greedy", "beam")
N_EXAMPLES = 8  # generated captions stored in evaluation.json for people to read


@dataclass(frozen=True)
class EvaluateConfig(ActorPoolConfig):
    """What to evaluate and how. Caption defaults follow BLIP's COCO evaluation (beam 3, min length 5). The pool
    fields say how the model work runs: `concurrency` Ray tasks share the ITM re-rank, each with `num_gpus`."""

    checkpoint: Location  # a capfilt checkpoint folder or a transformers BLIP folder (vlp_core.checkpoint)
    test_annotations: Location  # COCO Karpathy json of the held-out set
    test_image_root: Location  # the folder its image paths are relative to
    k_test: int = 16  # ITC candidates per query re-ranked by ITM
    caption_method: str = "beam"  # "greedy" or "beam"
    num_beams: int = 3
    min_length: int = 5  # caption tokens after the prompt
    max_length: int = 30
    world_dir: Location | None = None  # a synthetic world folder: adds the world metrics

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(
            type(self).__name__,
            [
                (location(self.checkpoint).is_dir(), f"checkpoint {self.checkpoint} is not a checkpoint folder"),
                (location(self.test_annotations).is_file(), f"test_annotations {self.test_annotations} is not a file"),
                (location(self.test_image_root).is_dir(), f"test_image_root {self.test_image_root} is not a folder"),
                (
                    self.world_dir is None or location(self.world_dir).is_dir(),
                    f"world_dir {self.world_dir} is not a folder",
                ),
                (self.k_test >= 1, f"k_test must be >= 1, got {self.k_test}"),
                (
                    self.caption_method in CAPTION_METHODS,
                    f"caption_method must be one of {CAPTION_METHODS}, got {self.caption_method!r}",
                ),
                (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
                (
                    0 <= self.min_length <= self.max_length,
                    f"need 0 <= min_length <= max_length, got {self.min_length} and {self.max_length}",
                ),
            ],
        )
        # a bad or wrong model stops here, before any work
        check_checkpoint(self.checkpoint, FILTER_NEEDS, "the evaluation's retrieval")


@dataclass(frozen=True)
class EncodedTestSet:
    """What the encoding task returns: ITC similarities (N images, T texts) and a caption per image id."""

    digest: str
    similarity: np.ndarray
    captions: dict[str, str]


def run_evaluate(config: EvaluateConfig, generation: Generation, output: Location | None = None) -> dict[str, Any]:
    """Evaluate `config.checkpoint` (trained on `generation`) and, on a world, `generation`'s data.

    Writes `output` (default `<generation>/evaluation.json`; several models trained on one generation, e.g.
    with other seeds, each need their own) and returns the same dict.
    """
    world = load_world(config.world_dir)[1] if config.world_dir is not None else None
    generation.counts()  # a bad generation or test set fails before any model work
    records = load_test_set(config)
    references = {record.image_id: list(record.captions) for record in records}
    text_image = [index for index, record in enumerate(records) for _ in record.captions]
    with progress("evaluate", total=2, unit="passes") as advance:  # encode and caption; ITM re-rank
        encoded: EncodedTestSet = _run_tasks(config, encode_and_caption, [(config,)])[0]
        similarity = encoded.similarity
        advance()
        itm = _itm_scores(config, top_k_pairs(similarity, config.k_test), similarity.shape)
        advance()

    results: dict[str, Any] = {
        "dataset": generation.dataset,
        "generation": generation.number,
        "checkpoint": {"path": str(absolute(location(config.checkpoint))), "digest": encoded.digest},
        "config": {key: str(value) if isinstance(value, Location) else value for key, value in asdict(config).items()},
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "test_set": {"images": len(references), "texts": sum(len(texts) for texts in references.values())},
        "retrieval": retrieval_recalls(
            reranked_scores(similarity, itm, config.k_test),
            reranked_scores(similarity.T, itm.T, config.k_test),
            text_image,
        ),
        "retrieval_itc": retrieval_recalls(similarity, similarity.T, text_image),
        "captioning": caption_scores(references, encoded.captions) if encoded.captions else None,
        "caption_examples": [
            {"image_id": image_id, "caption": caption, "reference": references[image_id][0]}
            for image_id, caption in list(encoded.captions.items())[:N_EXAMPLES]
        ],
    }
    if world is not None:
        results["world"] = world_metrics(generation, world, encoded.captions)
    atomic_write_json(output or generation.path / EVALUATION_FILE, results)
    log.info(
        "evaluate: %s on %s gen %d: %s, %s",
        encoded.digest,
        generation.dataset,
        generation.number,
        results["retrieval"],
        results["captioning"],
    )
    return results


def load_test_set(config: EvaluateConfig) -> list[CaptionRecord]:
    """The held-out images and their captions (`load_coco_karpathy` refuses an empty set and an image id
    shared by two images: the ids key the captions)."""
    return load_coco_karpathy(config.test_annotations, config.test_image_root)


def _run_tasks(config: EvaluateConfig, function: Callable, calls: list[tuple]) -> list[Any]:
    """`function(*args)` for each args of `calls`: in this process one after the other (`config.in_process`),
    or as Ray tasks with one CPU and the config's GPUs each."""
    if config.in_process:
        return [function(*args) for args in calls]
    init_ray(config.ray_address)
    task = ray.remote(num_cpus=1, num_gpus=config.num_gpus)(function)
    return ray.get([task.remote(*args) for args in calls])


def _itm_scores(config: EvaluateConfig, pairs: list[list[int]], shape: tuple[int, int]) -> np.ndarray:
    """(N, T) ITM scores of `pairs` (the texts to score per image), NaN elsewhere, from `concurrency` tasks
    (one in this process) that each score a contiguous slice of the images."""
    tasks = 1 if config.in_process else config.concurrency
    slices = [chunk for chunk in np.array_split(np.arange(len(pairs)), tasks) if len(chunk)]
    results = _run_tasks(config, score_pairs, [(config, int(chunk[0]), [pairs[i] for i in chunk]) for chunk in slices])
    itm = np.full(shape, np.nan, dtype=np.float32)
    for chunk, scores in zip(slices, results, strict=True):
        for image, image_scores in zip(chunk, scores, strict=True):
            itm[image, pairs[image]] = image_scores
    return itm


# --------------------------------------------------------------------------- the model (Ray tasks, or local)


def encode_and_caption(config: EvaluateConfig) -> EncodedTestSet:
    """ITC similarity of every test image and text, and one caption per image (a Ray task, or in-process);
    no captions from a model whose decoder or LM head is random (e.g. a released retrieval model)."""
    model, tokenizer, digest = _load_model(config)
    captioning = not random_parts(config.checkpoint, CAPTIONER_NEEDS)
    records = load_test_set(config)
    texts = [text for record in records for text in record.captions]
    text_features = _text_features(model, tokenizer, texts, config.batch_size)  # (T, E)
    image_features, captions = [], {}
    for batch_records, pixels in _image_batches(records, image_transform(model.config, train=False), config.batch_size):
        with inference_mode(model) as device:
            image_features.append(model.image_features(model.encode_image(pixels.to(device))).float().cpu())
        if captioning:
            for record, caption in zip(batch_records, _caption(model, tokenizer, pixels, config), strict=True):
                captions[record.image_id] = caption
    similarity = (torch.cat(image_features) @ text_features.T).numpy()  # (N, T)
    return EncodedTestSet(digest=digest, similarity=similarity, captions=captions)


def score_pairs(config: EvaluateConfig, first_image: int, pairs: list[list[int]]) -> list[list[float]]:
    """ITM match probabilities of test images first_image, first_image + 1, ... with the texts (indices
    into all test captions, image-major) listed for each in `pairs` (a Ray task, or in-process)."""
    model, tokenizer, _ = _load_model(config)
    records = load_test_set(config)
    texts = [text for record in records for text in record.captions]
    images = records[first_image : first_image + len(pairs)]
    scores: list[list[float]] = []
    transform = image_transform(model.config, train=False)
    for batch_records, pixels in _image_batches(images, transform, config.batch_size):
        batch_pairs = pairs[len(scores) : len(scores) + len(batch_records)]
        candidate_texts = [[texts[t] for t in candidates] for candidates in batch_pairs]
        scores += [s.itm for s in score_captions(model, tokenizer, pixels, candidate_texts, config.batch_size)]
    return scores


def _load_model(config: EvaluateConfig) -> tuple[BlipModel, PreTrainedTokenizerBase, str]:
    """The checkpoint on the task's GPU if it was given one, else on the CPU."""
    device = "cuda" if config.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    return load_checkpoint(config.checkpoint, device)


def _image_batches(
    records: list[CaptionRecord], transform: ImageTransform, batch_size: int
) -> Iterator[tuple[list[CaptionRecord], torch.Tensor]]:
    """The records in batches with their pixels (B, 3, S, S)."""
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        yield batch, torch.stack([transform(load_image(record.image_path)) for record in batch])


def _text_features(
    model: BlipModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int
) -> torch.Tensor:
    """(T, E) L2-normalised ITC features of the texts."""
    features = []
    with inference_mode(model) as device:
        for start in range(0, len(texts), batch_size):
            input_ids, attention_mask = tokenize(
                tokenizer, texts[start : start + batch_size], model.config.max_text_length, device
            )
            embeds = model.encode_text(input_ids, attention_mask)
            features.append(model.text_features(embeds).float().cpu())
    return torch.cat(features)


def _caption(
    model: BlipModel, tokenizer: PreTrainedTokenizerBase, pixels: torch.Tensor, config: EvaluateConfig
) -> list[str]:
    """One caption per image (B, 3, S, S), greedy or by beam search."""
    captions = generate(
        model,
        tokenizer,
        pixels,
        method=config.caption_method,
        num_beams=config.num_beams,
        min_length=config.min_length,
        max_length=config.max_length,
    )
    return [candidates[0] for candidates in captions]


# --------------------------------------------------------------------------- the world's truth


def world_metrics(generation: Generation, world: WorldPaths, test_captions: dict[str, str]) -> dict[str, Any]:
    """Metrics that need the world's ground truth: caption attribute accuracy on the test set, and the
    generation's filter decisions and kept captions against the web pairs' noise labels and scenes. The
    generation is read part by part (an image's web and synthetic rows share a part)."""
    scenes = load_scenes(world)
    truth = read_parquet(world.web_noise, columns=["key", "noise_type"]).to_pydict()
    noise_by_key = dict(zip(truth["key"], truth["noise_type"]))
    decisions: Counter[tuple[str, str]] = Counter()
    kept_accuracy = {source: AccuracyTally() for source in ("web", "synthetic")}
    for part in generation.iter_parts(["image_id", *WEB_DECISION_COLUMNS, "caption"]):
        decisions += web_decisions(part, noise_by_key)
        rows = part.filter(part["kept"]).to_pylist()
        web_rows = part.filter(pc.equal(part["caption_source"], "web"))
        scene_of_image = {
            image: scenes[web_key(url)]
            for image, url in zip(web_rows["image_id"].to_pylist(), web_rows["url"].to_pylist())
        }
        for row in rows:
            if row["caption_source"] in kept_accuracy:
                kept_accuracy[row["caption_source"]].add(row["caption"] or "", scene_of_image[row["image_id"]])
    return {
        "test_caption_accuracy": attribute_accuracy_summary(test_captions, scenes),
        # Images that failed to download or decode never met the filter: they count in the decision table only.
        **decision_metrics(decisions, FILTER_STAGE, unscreened=UNSCREENED_STAGES),
        "kept_caption_accuracy": {source: tally.summary() for source, tally in kept_accuracy.items()},
    }
