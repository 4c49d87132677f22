"""Training step: samples/s and peak memory of BLIP's full pretraining step at the tiny and base presets.

The step is `BlipPretrainer` with ITC (momentum encoders, feature queues, distillation) + ITM (hard
negatives) + LM, then backward and AdamW, on a fixed batch of world pairs. As a reference, the same
model's LM-only step (the captioner fine-tune) is measured alongside. Peak memory is CUDA's
max_memory_allocated on a GPU; on the CPU it is the process's resident-set high-water mark (VmHWM),
reset before each preset where Linux allows it. Beside samples/s: TFLOP/s achieved (FLOPs of one step as
`torch.utils.flop_counter` counts them) and, on a GPU of known peak, MFU.
"""

from __future__ import annotations

import functools
import resource
from pathlib import Path

import torch

from benchmarks.harness import Report, machine, measure, process_status_kib
from benchmarks.workload import random_blip, train_step, training_batch, world_pairs
from vlp_core.pretrain import CAPTIONER, PRETRAIN, BlipPretrainer, configure_optimizer, prompt_length
from vlp_core.tokenizer import special_ids

SIZES = (("tiny", 32), ("base", 4))  # (preset, batch): on a CPU
GPU_SIZES = (("base", 64), ("base", 256), ("large", 64))  # BLIP pretrains at 224 px, the presets' size
QUICK_SIZES = (("tiny", 8),)
CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif CLEAR_REFS.exists():
        try:
            CLEAR_REFS.write_text("5")  # resets the VmHWM high-water mark (Linux >= 4.0)
        except OSError:
            pass  # not allowed here: the peak then covers the whole process so far


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak_kib = process_status_kib("VmHWM")
    if peak_kib is not None:
        return peak_kib / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def run(quick: bool = False, repeats: int | None = None) -> Report:
    repeats = repeats or (1 if quick else 3)
    report = Report(
        "training",
        quick,
        machine(),
        notes=[
            "full step: BlipPretrainer ITC (momentum model, queues, distillation) + ITM (hard negatives) + LM, "
            "backward, AdamW; reference: the same model's LM-only step; random weights, world pairs, fixed batch",
            "peak memory: CUDA max_memory_allocated, or on the CPU the process RSS high-water mark (VmHWM)",
        ],
    )
    sizes = QUICK_SIZES if quick else GPU_SIZES if torch.cuda.is_available() else SIZES
    for preset, batch_size in sizes:
        model, tokenizer = random_blip(preset)
        device = next(model.parameters()).device
        images, captions = world_pairs(batch_size, model.config.vision.image_size)
        for name, objectives in (("full pretraining step", PRETRAIN), ("LM-only step", CAPTIONER)):
            prompt = model.config.prompt if objectives == CAPTIONER else ""
            reset_peak_memory(device)
            pretrainer = BlipPretrainer(
                model, special_ids(tokenizer), prompt_length(tokenizer, prompt), objectives
            ).train()
            optimizer = configure_optimizer(pretrainer, lr=1e-4, weight_decay=0.05)
            batch = training_batch(model, tokenizer, images, captions, prompt)
            measurement = measure(
                f"{preset} {name}, batch {batch_size}",
                "samples/s",
                batch_size,
                functools.partial(train_step, pretrainer, optimizer, batch),
                repeats,
                count_flops=True,
            )
            measurement.extra["peak memory GiB"] = round(peak_memory_gib(device), 3)
            parameters = sum(p.numel() for p in pretrainer.parameters())
            measurement.extra["parameters incl. momentum copy (M)"] = round(parameters / 1e6, 1)
            report.measurements.append(measurement)
    return report
