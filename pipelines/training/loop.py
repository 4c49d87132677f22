"""The training loop (each Ray Train worker runs it, or the local executor in-process), and the
checkpoints that let a run resume.

    <run_dir>/checkpoints/step-<N>/   the exported model (a capfilt checkpoint, or clip.safetensors) +
                                      training_state.pt (trainee and optimizer state, RNG, loss history),
                                      written last: a step folder without it is ignored
    <run_dir>/final/                  the exported model of the last step + training.json (written last)

Rank 0 writes every file. A worker that starts in a run_dir with checkpoints continues from the latest
one at or below the run's total steps (a restarted run, or Ray Train restarting a failed worker group).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from pipelines.progress import progress
from pipelines.training.config import TrainConfig
from pipelines.training.data import EpochOrder, PairDataset, PairFile, derive_seed
from pipelines.training.tasks import Schedule, build_task
from vlp_core.atomic import atomic_write_bytes, atomic_write_json
from vlp_core.pretrain import configure_optimizer
from vlp_core.storage import Location

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
SUMMARY_FILE = "training.json"


@dataclass(frozen=True)
class TrainSpec:
    """One run, as the driver hands it to every worker (paths must be visible to all workers)."""

    task: str  # one of training.tasks.TASKS
    config: TrainConfig
    run_dir: Location
    pairs: PairFile  # each worker reads it a batch at a time
    image_dir: Location  # what relative image_refs are relative to
    tokenizer_dir: Location | None  # BLIP from a preset: the tokenizer to use
    steps_per_epoch: int
    total_steps: int


@dataclass(frozen=True)
class Placement:
    """Where a training loop runs: its rank among `world_size` workers, its device, and how its model and
    data loader are wrapped for data parallelism (unchanged in a single process)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prepare_model: Callable[[nn.Module, bool], nn.Module] = lambda model, find_unused_parameters: model
    prepare_loader: Callable[[DataLoader], DataLoader] = lambda loader: loader


def train_loop(spec: TrainSpec, placement: Placement) -> None:
    """Build, resume, then one loop over steps until `total_steps`."""
    config = spec.config
    rank, world_size, device = placement.rank, placement.world_size, placement.device

    torch.set_num_threads(config.cpus_per_worker)
    if device.type == "cpu" and not torch.are_deterministic_algorithms_enabled():
        # a run repeats itself on several threads too: without these kernels some backward passes sum in an
        # order that varies between runs (two 30-step pretrainings on 2 threads ended 0.003 apart in weights)
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    task = build_task(
        spec.task,
        preset=config.preset,
        init_checkpoint=config.init_checkpoint,
        tokenizer_dir=spec.tokenizer_dir,
        clip_model=config.clip_model,
        schedule=Schedule(spec.steps_per_epoch, config.itc_warmup_steps, config.easy_negative_steps),
        seed=derive_seed(config.seed, "itm", rank),
        device=device,
    )
    trainee = task.trainee
    optimizer = configure_optimizer(trainee, config.lr, config.weight_decay)
    step, history = 0, []
    resume_from = latest_checkpoint(spec.run_dir, spec.total_steps)
    if resume_from is not None:
        step, history = load_training_state(resume_from, trainee, optimizer, device)
        log.info("%s: resuming from %s (step %d)", spec.task, resume_from, step)
    model = placement.prepare_model(trainee, task.find_unused_parameters)
    dataset = PairDataset(spec.pairs, spec.image_dir, task.transform, task.caption_prefix)

    with progress(spec.task, total=spec.total_steps, unit="steps", done=step) as advance:
        while step < spec.total_steps:
            epoch, batches_done = divmod(step, spec.steps_per_epoch)
            order = EpochOrder(
                len(dataset),
                config.batch_size,
                rank,
                world_size,
                config.seed,
                epoch,
                start=batches_done * config.batch_size,
            )
            loader = placement.prepare_loader(
                DataLoader(
                    dataset,
                    batch_size=config.batch_size,
                    sampler=order,
                    collate_fn=task.collate,
                    num_workers=config.loader_workers,
                )
            )
            for batch in loader:
                batch = on_device(batch, device)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, spec.total_steps, config.warmup_steps, config.lr)
                losses = model(batch, step)
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                optimizer.step()
                step += 1
                advance()

                history.append({"step": step, **{name: value.item() for name, value in losses.items()}})
                if rank == 0 and (step % config.log_every == 0 or step == spec.total_steps):
                    log.info(
                        "%s step %d/%d  %s",
                        spec.task,
                        step,
                        spec.total_steps,
                        "  ".join(f"{k} {v:.4f}" for k, v in history[-1].items() if k != "step"),
                    )
                if rank == 0 and (step % config.checkpoint_every == 0 or step == spec.total_steps):
                    save_training_state(
                        spec.run_dir / "checkpoints" / f"step-{step}", trainee, optimizer, step, history
                    )
                if step == spec.total_steps:
                    break

    if rank == 0:
        final = spec.run_dir / "final"
        digest = trainee.export(final)
        atomic_write_json(
            final / SUMMARY_FILE, {"task": spec.task, "steps": step, "digest": digest, "history": history}
        )


def on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on `device` (the loader makes them on the CPU; Ray Train's prepared loader
    has moved them already, and then this copies nothing); other values (captions) as they are."""
    return {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in batch.items()}


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to `peak` over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def save_training_state(
    directory: Location,
    trainee: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    history: list[dict[str, float]],
) -> None:
    """Export the model into `directory`, then write the resume state beside it (last, atomically)."""
    trainee.export(directory)
    state = {
        "step": step,
        "history": history,
        "trainee": trainee.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(directory / STATE_FILE, buffer.getvalue())


def load_training_state(
    directory: Location, trainee: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[int, list[dict[str, float]]]:
    """Restore trainee, optimizer and RNG from a step folder (tensors only: `weights_only=True`);
    returns (step, loss history)."""
    state_bytes = io.BytesIO((directory / STATE_FILE).read_bytes())
    state: dict[str, Any] = torch.load(state_bytes, map_location=device, weights_only=True)
    trainee.load_state_dict(state["trainee"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"].cpu())
    return state["step"], state["history"]


def latest_checkpoint(run_dir: Location, max_step: int) -> Location | None:
    """The complete step folder with the highest step ≤ `max_step`, if any."""
    steps = {
        int(folder.name.removeprefix("step-")): folder
        for folder in (run_dir / "checkpoints").glob("step-*")
        if folder.name.removeprefix("step-").isdigit() and (folder / STATE_FILE).is_file()
    }
    eligible = [n for n in steps if n <= max_step]
    return steps[max(eligible)] if eligible else None
