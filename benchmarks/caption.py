"""Caption generation: our captioner vs `transformers.BlipForConditionalGeneration.generate`.

Both run the SAME weights (ours exported to transformers' layout with `export_hf_captioner`) on the
same images with the same sampling: nucleus top_p 0.9 (transformers' top_k filter off), K = 10 captions
per image, at most 30 and at least 5 caption tokens. Both return decoded strings. Equal output
distribution is checked two ways: greedy captions must be identical, and under sampling the caption
length and token statistics are printed side by side, with the same statistics between two
transformers runs of different seeds as the noise floor.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import BlipForConditionalGeneration, PreTrainedTokenizerBase

from benchmarks.harness import Report, compare, flop_figures, machine
from benchmarks.workload import captioner_under_test, pixel_batch, random_blip
from vlp_core.blip import BlipModel
from vlp_core.checkpoint import export_hf_captioner
from vlp_core.generation import generate
from vlp_core.inference import for_inference
from vlp_core.tokenizer import special_ids

SAMPLING = {"top_p": 0.9, "num_captions": 10, "max_length": 30, "min_length": 5}
BATCH_SIZES, QUICK_BATCH_SIZES = (1, 16, 64), (1, 4)
GPU_BATCH_SIZES, GPU_PRESET, GPU_IMAGE_SIZE = (16, 64, 256), "base", 384  # the size released captioners run at
GREEDY_IMAGES = 16
QUICK_CAPTIONER_STEPS = 5  # quick mode checks that it runs, not what the captions look like
Captions = list[list[str]]  # per image, its captions


class HFCaptioner:
    """transformers' BLIP captioner on our exported weights, called as users call it."""

    def __init__(self, model: BlipModel, tokenizer: PreTrainedTokenizerBase, folder: Path):
        export_hf_captioner(model, tokenizer, folder)
        weights = next(model.parameters())  # the same device and dtype as ours (bf16 weights on a GPU)
        self.model = BlipForConditionalGeneration.from_pretrained(folder).to(weights.device, weights.dtype).eval()
        self.tokenizer = tokenizer
        ids = special_ids(tokenizer)
        prompt = tokenizer(model.config.prompt, add_special_tokens=False)["input_ids"]
        self.prompt = [ids.dec, *prompt, ids.sep]  # BlipForConditionalGeneration drops the last token
        # ids the tokenizer cannot decode are never produced by ours; suppress them here too
        self.suppressed = list(range(len(tokenizer), model.config.text.vocab_size)) or None

    def generate(
        self, pixels: torch.Tensor, num_captions: int, max_length: int, min_length: int, top_p: float | None = None
    ) -> Captions:
        """Nucleus sampling with top_p, or greedy decoding when top_p is None."""
        sampling = {"do_sample": True, "top_p": top_p, "top_k": 0} if top_p else {"do_sample": False}
        device = pixels.device
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            output = self.model.generate(
                pixel_values=pixels,
                input_ids=torch.tensor([self.prompt] * len(pixels), device=device),
                num_return_sequences=num_captions,
                max_new_tokens=max_length,
                min_new_tokens=min_length,
                suppress_tokens=self.suppressed,
                **sampling,
            )
        texts = self.tokenizer.batch_decode(output[:, len(self.prompt) - 1 :], skip_special_tokens=True)
        return [texts[i : i + num_captions] for i in range(0, len(texts), num_captions)]


def caption_statistics(
    captions: Captions, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, float | Counter]:
    """Length and token statistics of sampled captions (lengths in tokens, [SEP] excluded)."""
    flat = [caption for per_image in captions for caption in per_image]
    tokens = [tokenizer(caption, add_special_tokens=False)["input_ids"] for caption in flat]
    lengths = [len(ids) for ids in tokens]
    return {
        "captions": len(flat),
        "mean_length": statistics.mean(lengths),
        "std_length": statistics.pstdev(lengths),
        "at_max_length": sum(length >= max_length for length in lengths) / len(lengths),
        "distinct_per_image": statistics.mean(len(set(per_image)) / len(per_image) for per_image in captions),
        "distinct_tokens": len({token for ids in tokens for token in ids}),
        "unigrams": Counter(token for ids in tokens for token in ids),
    }


def total_variation(first: Counter, second: Counter) -> float:
    """Total-variation distance between two token frequency distributions, in [0, 1]."""
    total_first, total_second = sum(first.values()), sum(second.values())
    return 0.5 * sum(abs(first[t] / total_first - second[t] / total_second) for t in first.keys() | second.keys())


def _seeded(function: Callable[[], Captions], seed: int) -> Callable[[], Captions]:
    def run() -> Captions:
        torch.manual_seed(seed)
        return function()

    return run


def run(quick: bool = False, repeats: int | None = None, checkpoint: Path | None = None) -> Report:
    repeats = repeats or (1 if quick else 5)
    on_gpu = torch.cuda.is_available() and not quick
    batch_sizes = QUICK_BATCH_SIZES if quick else GPU_BATCH_SIZES if on_gpu else BATCH_SIZES
    if on_gpu and checkpoint is None:  # the size users caption at; random weights run every caption to max_length
        model, tokenizer = random_blip(GPU_PRESET, image_size=GPU_IMAGE_SIZE, full_vocabulary=True)
        described = f"preset {GPU_PRESET} at {GPU_IMAGE_SIZE} px, random weights, vocabulary {len(tokenizer)}"
    else:
        model, tokenizer, described = captioner_under_test(checkpoint, steps=QUICK_CAPTIONER_STEPS if quick else None)
    model = for_inference(model)  # as the caption actors hold it: bf16 weights on a GPU
    report = Report(
        "caption",
        quick,
        machine(),
        notes=[
            f"model: {described}; sampling {SAMPLING}; images/s counts images, each with K captions",
            "baseline: transformers BlipForConditionalGeneration.generate (same weights, same images); ours: "
            "vlp_core.generation.generate with one seed per image",
        ],
    )
    pixels = pixel_batch(model, max(*batch_sizes, GREEDY_IMAGES))
    with tempfile.TemporaryDirectory() as folder:
        hf = HFCaptioner(model, tokenizer, Path(folder))
    limits = {"max_length": SAMPLING["max_length"], "min_length": SAMPLING["min_length"]}

    greedy_pixels = pixels[:GREEDY_IMAGES]
    ours_greedy = generate(model, tokenizer, greedy_pixels, method="greedy", **limits)
    hf_greedy = hf.generate(greedy_pixels, 1, **limits)
    report.figures["greedy captions identical to transformers"] = (
        f"{sum(a == b for a, b in zip(ours_greedy, hf_greedy))}/{len(greedy_pixels)}"
    )

    for batch in batch_sizes:
        images = pixels[:batch]
        ours = functools.partial(generate, model, tokenizer, images, seeds=list(range(len(images))), **SAMPLING)
        baseline = _seeded(lambda images=images: hf.generate(images, **SAMPLING), seed=batch)
        comparison = compare(
            f"batch {batch} images x {SAMPLING['num_captions']} captions", "images/s", batch, baseline, ours, repeats
        )
        report.comparisons.append(comparison)
        report.figures |= flop_figures(f"batch {batch}, ours", ours, statistics.median(comparison.ours_s))

    images = pixels[: batch_sizes[-1]]
    samples = {
        "ours": generate(model, tokenizer, images, seeds=[1000 + i for i in range(len(images))], **SAMPLING),
        "transformers": _seeded(lambda: hf.generate(images, **SAMPLING), seed=1)(),
        "transformers, another seed": _seeded(lambda: hf.generate(images, **SAMPLING), seed=2)(),
    }
    stats = {
        name: caption_statistics(captions, tokenizer, SAMPLING["max_length"]) for name, captions in samples.items()
    }
    for name, values in stats.items():
        for key, value in values.items():
            if key != "unigrams":
                report.figures[f"sampled {name}: {key}"] = value
    report.figures["token distribution TV distance ours vs transformers"] = total_variation(
        stats["ours"]["unigrams"], stats["transformers"]["unigrams"]
    )
    report.figures["token distribution TV distance transformers vs transformers (another seed)"] = total_variation(
        stats["transformers"]["unigrams"], stats["transformers, another seed"]["unigrams"]
    )
    report.figures["example ours"] = samples["ours"][0][0]
    report.figures["example transformers"] = samples["transformers"][0][0]
    return report
