"""Where the time goes: one caption call and one pretraining step under torch's profiler, at the sizes
`bench caption` and `bench training` run on a GPU (base at 384 px, 64 images x 10 captions; base at 224 px,
batch 64). For each: the wall time, the share of it the GPU was busy (kernel time / wall time: low means
launch- or host-bound) and the operations that took the most device time (CPU time without a GPU).

`benchmarks/gpu_check.sh` runs it after the benchmarks, so that a session lent a GPU brings back what to
speed up next (#16). `python -m benchmarks.gpu_profile --quick` runs it at tiny sizes, e.g. on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.caption import GPU_IMAGE_SIZE, GPU_PRESET, SAMPLING
from benchmarks.workload import pixel_batch, random_blip, train_step, training_batch, world_pairs
from vlp_core.generation import generate
from vlp_core.inference import for_inference
from vlp_core.pretrain import PRETRAIN, BlipPretrainer, configure_optimizer, prompt_length
from vlp_core.tokenizer import special_ids

CAPTION_IMAGES, TRAIN_BATCH, TOP_OPERATIONS = 64, 64, 15
QUICK_CAPTION_IMAGES, QUICK_TRAIN_BATCH = 4, 8


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profiled(label: str, work: Callable[[], object]) -> str:
    """`work` once untimed, then once under the profiler: its wall time, device busy share and top operations."""
    work()
    _synchronize()
    on_gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        work()
        _synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    operations = profiler.key_averages()
    lines = [f"== {label}: wall {wall_us / 1e3:.1f} ms"]
    if on_gpu:
        busy_us = sum(operation.self_device_time_total for operation in operations)
        lines[0] += f", GPU busy {busy_us / wall_us:.0%} of it ({busy_us / 1e3:.1f} ms of kernels)"
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    lines.append(operations.table(sort_by=sort_by, row_limit=TOP_OPERATIONS))
    return "\n".join(lines)


def caption_work(quick: bool) -> tuple[str, Callable[[], object]]:
    """Captions as the caption actors write them (bf16 weights on a GPU), one seed per image."""
    images = QUICK_CAPTION_IMAGES if quick else CAPTION_IMAGES
    preset, image_size = ("tiny", None) if quick else (GPU_PRESET, GPU_IMAGE_SIZE)
    model, tokenizer = random_blip(preset, image_size=image_size, full_vocabulary=not quick)  # as bench caption
    model = for_inference(model)
    pixels = pixel_batch(model, images)
    label = f"caption: {model.config.name} at {model.config.vision.image_size} px, {images} images x K=10"
    return label, functools.partial(generate, model, tokenizer, pixels, seeds=list(range(images)), **SAMPLING)


def training_work(quick: bool) -> tuple[str, Callable[[], object]]:
    """One full pretraining step (ITC + ITM + LM, backward, AdamW) on a fixed batch of world pairs."""
    batch_size = QUICK_TRAIN_BATCH if quick else TRAIN_BATCH
    model, tokenizer = random_blip("tiny" if quick else "base")
    trainee = BlipPretrainer(model, special_ids(tokenizer), prompt_length(tokenizer, ""), PRETRAIN).train()
    optimizer = configure_optimizer(trainee, lr=1e-4, weight_decay=0.05)
    images, captions = world_pairs(batch_size, model.config.vision.image_size)
    batch = training_batch(model, tokenizer, images, captions)
    label = f"pretraining step: {model.config.name} at {model.config.vision.image_size} px, batch {batch_size}"
    return label, functools.partial(train_step, trainee, optimizer, batch)


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    quick = parser.parse_args(arguments).quick
    for make_work in (caption_work, training_work):
        print(profiled(*make_work(quick)), flush=True)


if __name__ == "__main__":
    main()
