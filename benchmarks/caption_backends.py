"""Caption speed of a captioner backend (`vlp_core.captioners`) on a released folder: capfilt's seeded sampling
against the model's own sampler on the same weights and images.

Both sample K = 10 captions per image with nucleus top_p 0.9, at least 5 and at most 30 caption tokens.
The baseline is what a user would call: transformers' `generate(do_sample=True, top_p=0.9, top_k=0,
num_return_sequences=K)` on the processor's inputs (BLIP-2, InstructBLIP, LLaVA). open_clip's own
`CoCa.generate` cannot run beside transformers 5 (it imports the removed `BeamSearchScorer`), so CoCa is
measured alone. Images are the synthetic world's, the same for every backend.
"""

from __future__ import annotations

import functools

import torch

from benchmarks.harness import Report, compare, machine, measure
from benchmarks.workload import default_device, world_pairs
from vlp_core.captioners import Sampling, load_captioner
from vlp_core.captioners.vlm import KINDS, VlmCaptioner
from vlp_core.inference import inference_mode
from vlp_core.storage import Location, local_copy, location

SAMPLING = Sampling(num_captions=10, top_p=0.9, min_length=5, max_length=30)
BATCH_SIZES, QUICK_BATCH_SIZES = (1, 16), (2,)
BASELINE = "transformers generate, do_sample=True (same weights, images, sampling)"
IMAGE_SOURCE_SIZE = 256  # world images are rendered at this size; each backend's processor resizes them


def run(
    quick: bool = False, repeats: int | None = None, backend: str = "blip2", checkpoint: Location | None = None
) -> Report:
    if checkpoint is None:
        raise ValueError(f"bench caption --backend {backend}: give --checkpoint, the model's folder")
    checkpoint = local_copy(location(checkpoint))  # both sides load the same local folder
    repeats = repeats or (1 if quick else 3)
    captioner = load_captioner(backend, checkpoint, default_device())
    batch_sizes = QUICK_BATCH_SIZES if quick else BATCH_SIZES
    images = world_pairs(max(batch_sizes), IMAGE_SOURCE_SIZE)[0]
    pixels = torch.stack([captioner.transform(image) for image in images])
    report = Report(
        f"caption --backend {backend}",
        quick,
        machine(),
        notes=[
            f"model: {checkpoint} ({captioner.model_ref}), prompt {captioner.prompt!r}; sampling {SAMPLING}; "
            "images/s counts images, each with K captions",
            "ours: vlp_core.captioners (one seed per image); baseline: "
            + (
                "transformers generate, do_sample=True (same weights, images, sampling)" if backend in KINDS else "none"
            ),
        ],
    )
    for batch in batch_sizes:
        batch_pixels, seeds = pixels[:batch], list(range(batch))
        ours = functools.partial(captioner.caption, batch_pixels, seeds, SAMPLING)
        label = f"batch {batch} images x {SAMPLING.num_captions} captions"
        if isinstance(captioner, VlmCaptioner):
            baseline = functools.partial(transformers_sampling, captioner, batch_pixels)
            report.comparisons.append(compare(label, "images/s", batch, baseline, ours, repeats))
        else:
            report.measurements.append(measure(label, "images/s", batch, ours, repeats))
    report.figures["example"] = captioner.caption(pixels[:1], [0], SAMPLING)[0][0]
    return report


def transformers_sampling(captioner: VlmCaptioner, pixels: torch.Tensor) -> list[str]:
    """The model's own sampler, as its model card calls it, on the same inputs as ours."""
    with inference_mode(captioner.model) as device:
        output = captioner.model.generate(
            **captioner.model_inputs(pixels, device),
            do_sample=True,
            top_p=SAMPLING.top_p,
            top_k=0,
            num_return_sequences=SAMPLING.num_captions,
            max_new_tokens=SAMPLING.max_length,
            min_new_tokens=SAMPLING.min_length,
        )
    return captioner.tokenizer.batch_decode(captioner.new_tokens(output), skip_special_tokens=True)
