"""Scoring: the filter's ITM + ITC scores and the CLIP ranker's scores of K candidate captions per image.

Ours computes each image's features once and reuses them over its candidates (`score_captions`,
`ClipRanker.image_features` + `ClipRanker.scores`). The baseline is the naive per-pair forward that
a dataset of (image, caption) pairs invites: every pair carries its own image through both vision
encoders, in batches of the same size. Both return the same numbers.

The marginal cost of one more caption is measured as (time with 2K candidates - time with K) / (N K),
against the cost of encoding one image (both vision encoders); the goal is at most 1/5. It is measured
at the tiny preset (a few image tokens, captions of ~15 tokens: images are barely bigger than
captions) and, in the full run, at the base preset with open_clip's ViT-B-32 (224 px: 197 + 50 image
tokens; and 384 px, 577 + 50, the size of BLIP's released retrieval checkpoints), the sizes real
filters run at. On a CPU the naive comparison runs at tiny only (per-pair base forwards take minutes); on a
GPU everything runs at base, 384 px, with 256 images. Ours also reports the TFLOP/s it achieved (and MFU).
"""

from __future__ import annotations

import functools
import statistics

import timm
import torch

from benchmarks.harness import Comparison, Report, compare, flop_figures, machine, time_once
from benchmarks.workload import pixel_batch, random_blip, world_captions
from vlp_core.blip import BlipModel
from vlp_core.clip import ClipRanker, load_clip
from vlp_core.inference import for_inference, inference_mode
from vlp_core.scoring import score_captions
from vlp_core.tokenizer import special_ids, tokenize

CANDIDATES = 11  # K: 10 synthetic captions and the web caption, as the filter and rank stages see them
IMAGES, QUICK_IMAGES, GPU_IMAGES = 32, 4, 256
BASE_IMAGES = 8  # images of the base-preset marginal-cost measurements
RETRIEVAL_IMAGE_SIZE = 384  # BLIP's released ITM/retrieval checkpoints (the filters) run ViT-B/16 at 384 px
BATCH_SIZE = 64  # captions per forward, both sides
CLIP_MODELS = {"tiny": "clip_tiny", "base": "ViT-B-32"}  # the ranker scored alongside each BLIP preset


class Scorer:
    """BLIP filter and CLIP ranker (random weights) of one size, on the same images and captions."""

    def __init__(self, preset: str, image_size: int | None = None) -> None:
        self.preset = preset
        model, self.tokenizer = random_blip(preset, image_size=image_size)
        self.model = for_inference(model)  # as the filter actors hold it: bf16 weights on a GPU
        self.clip_model = CLIP_MODELS[preset]
        self.clip: ClipRanker = load_clip(self.clip_model, device=next(self.model.parameters()).device)

    def ours(self, pixels: torch.Tensor, clip_pixels: torch.Tensor, captions: list[list[str]]) -> list[float]:
        """Image features once per image, reused over its candidates."""
        blip = score_captions(self.model, self.tokenizer, pixels, captions, batch_size=BATCH_SIZE)
        clip = self.clip.scores(self.clip.image_features(clip_pixels), captions)
        return [value for scores in blip for value in scores.itm] + [value for s in clip for value in s.tolist()]

    def naive(self, pixels: torch.Tensor, clip_pixels: torch.Tensor, captions: list[list[str]]) -> list[float]:
        """Every (image, caption) pair through both full models, BATCH_SIZE pairs at a time."""
        owners = [image for image, candidates in enumerate(captions) for _ in candidates]
        texts = [text for candidates in captions for text in candidates]
        itm_scores, clip_scores = [], []
        for start in range(0, len(texts), BATCH_SIZE):
            owner, batch = owners[start : start + BATCH_SIZE], texts[start : start + BATCH_SIZE]
            itm_scores += self._pair_itm(pixels[owner], batch)
            image_features = self.clip.image_features(clip_pixels[owner])
            clip_scores += (self.clip.text_features(batch) * image_features).sum(dim=-1).tolist()
        return itm_scores + clip_scores

    def _pair_itm(self, pixels: torch.Tensor, texts: list[str]) -> list[float]:
        model: BlipModel = self.model
        with inference_mode(model) as device:
            image_embeds = model.encode_image(pixels.to(device))
            input_ids, attention_mask = tokenize(self.tokenizer, texts, model.config.max_text_length, device)
            text_features = model.text_features(model.encode_text(input_ids, attention_mask))
            (text_features * model.image_features(image_embeds)).sum(dim=-1)  # ITC, as the filter computes it
            input_ids[:, 0] = special_ids(self.tokenizer).enc
            return model.itm_logits(image_embeds, input_ids, attention_mask).float().softmax(dim=-1)[:, 1].tolist()

    def encode_images(self, pixels: torch.Tensor, clip_pixels: torch.Tensor) -> None:
        """Both vision encoders once over the images (the cost the marginal caption is compared to)."""
        with inference_mode(self.model) as device:
            self.model.image_features(self.model.encode_image(pixels.to(device)))
        self.clip.image_features(clip_pixels)


def candidate_captions(images: int, per_image: int) -> list[list[str]]:
    captions = world_captions(images * per_image, seed=7)
    return [captions[i * per_image : (i + 1) * per_image] for i in range(images)]


def scorer_inputs(scorer: Scorer, images: int) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """BLIP pixels (N, 3, S, S), CLIP pixels (N, 3, S', S') of the same world images, K captions each."""
    pixels = pixel_batch(scorer.model, images)
    clip_size = scorer.clip.model.visual.image_size
    clip_pixels = torch.nn.functional.interpolate(pixels, size=tuple(clip_size), mode="bilinear")
    return pixels, clip_pixels, candidate_captions(images, CANDIDATES)


def marginal_caption_cost(report: Report, scorer: Scorer, images: int, repeats: int) -> None:
    """Figures: one more caption's cost against one image encode (BLIP + CLIP vision), K and 2K candidates
    timed in turns with the encode alone, so that load changes hit all three alike."""
    pixels, clip_pixels, captions = scorer_inputs(scorer, images)
    doubled = candidate_captions(images, 2 * CANDIDATES)
    scorer.ours(pixels, clip_pixels, captions)  # warm-up
    single, double, encode = [], [], []
    for _ in range(repeats):
        single.append(time_once(lambda: scorer.ours(pixels, clip_pixels, captions))[0])
        double.append(time_once(lambda: scorer.ours(pixels, clip_pixels, doubled))[0])
        encode.append(time_once(lambda: scorer.encode_images(pixels, clip_pixels))[0])
    caption_cost = (statistics.median(double) - statistics.median(single)) / (images * CANDIDATES)
    image_cost = statistics.median(encode) / images
    size = scorer.model.config.vision.image_size
    label = f"{scorer.preset} ({size} px) + {scorer.clip_model}, {images} images"
    report.figures[f"{label}: marginal cost of one caption (ms)"] = 1000 * caption_cost
    report.figures[f"{label}: cost of one image encode, BLIP + CLIP vision (ms)"] = 1000 * image_cost
    report.figures[f"{label}: marginal caption / image encode (goal <= 0.2)"] = caption_cost / image_cost


def vision_encode_comparison(images: int, repeats: int) -> Comparison:
    """One image encode of BLIP's filter size (ViT-B/16 at 384 px) against timm's `vit_base_patch16_384` (random
    weights; on a GPU both in bf16 weights, ours as the filter actors hold it). Each call ends on the host, so GPU
    work is waited for."""
    model = for_inference(random_blip("base", image_size=RETRIEVAL_IMAGE_SIZE)[0])
    device = next(model.parameters()).device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reference = timm.create_model("vit_base_patch16_384", pretrained=False, num_classes=0).to(device, dtype).eval()
    pixels = pixel_batch(model, images)

    def theirs() -> float:
        with torch.inference_mode():
            return reference.forward_features(pixels.to(dtype)).float().sum().item()

    def ours() -> float:
        with inference_mode(model):
            return model.encode_image(pixels).float().sum().item()

    label = f"one image encode, ViT-B/16 at {RETRIEVAL_IMAGE_SIZE} px, {images} images (baseline: timm)"
    return compare(label, "images/s", images, theirs, ours, repeats)


def run(quick: bool = False, repeats: int | None = None) -> Report:
    repeats = repeats or (1 if quick else 5)
    on_gpu = torch.cuda.is_available() and not quick
    images = QUICK_IMAGES if quick else GPU_IMAGES if on_gpu else IMAGES
    # on a GPU the filter's real size (base, 384 px) and the ranker's ViT-B-32; on a CPU per-pair base forwards
    # take minutes, so the comparison runs at tiny
    scorer = Scorer("base", RETRIEVAL_IMAGE_SIZE) if on_gpu else Scorer("tiny")
    pixels, clip_pixels, captions = scorer_inputs(scorer, images)
    report = Report(
        "scoring",
        quick,
        machine(),
        notes=[
            f"filter: BLIP preset {scorer.preset} at {scorer.model.config.vision.image_size} px (random weights), "
            f"ITM + ITC; ranker: open_clip {scorer.clip_model} (random weights); {images} images x {CANDIDATES} "
            f"candidates, {BATCH_SIZE} captions per forward",
            "baseline: naive per-pair forward (each pair encodes its image in both models); ours: image features once "
            "per image, cross-attention keys/values once per image, CLIP text up to the last token "
            "(vlp_core.scoring.score_captions, ClipRanker.image_features + scores)",
            *(
                []
                if quick or on_gpu
                else [
                    f"marginal cost also at preset base + {CLIP_MODELS['base']} (random weights), "
                    f"{BASE_IMAGES} images, BLIP at 224 px (the preset) and {RETRIEVAL_IMAGE_SIZE} px (BLIP's "
                    "released retrieval checkpoints, which the filter fine-tunes from)"
                ]
            ),
        ],
    )
    ours_scores = scorer.ours(pixels, clip_pixels, captions)
    naive_scores = scorer.naive(pixels, clip_pixels, captions)
    report.figures["max |ours - naive| score difference"] = max(abs(a - b) for a, b in zip(ours_scores, naive_scores))
    ours = functools.partial(scorer.ours, pixels, clip_pixels, captions)
    comparison = compare(
        f"{images} images x {CANDIDATES} captions",
        "captions/s",
        images * CANDIDATES,
        functools.partial(scorer.naive, pixels, clip_pixels, captions),
        ours,
        repeats,
    )
    report.comparisons.append(comparison)
    report.figures |= flop_figures("ours", ours, statistics.median(comparison.ours_s))
    marginal_caption_cost(report, scorer, images, repeats)
    if not quick:
        report.comparisons.append(vision_encode_comparison(GPU_IMAGES if on_gpu else BASE_IMAGES, min(repeats, 3)))
    if not quick and not on_gpu:
        for image_size in (None, RETRIEVAL_IMAGE_SIZE):
            marginal_caption_cost(report, Scorer("base", image_size), BASE_IMAGES, min(repeats, 3))
    return report
