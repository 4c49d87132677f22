"""Training stages on Ray Train: pretrain BLIP, fine-tune the captioner and the filter, train the CLIP ranker.

Each entry point turns its input into (image, caption) pairs, checks the run folder, and runs the one
training loop (`pipelines.train_loop.train_worker`) on a `TorchTrainer` with `num_workers` workers
(DDP when more than one). Results land in `run_dir`:

    run.json            what this run trains (task, config, data digest); a restart must match it
    tokenizer/          BLIP from a preset without a tokenizer: WordPiece trained on the captions
    checkpoints/step-N/ resumable checkpoints;  final/  the exported model + training.json

A finished run (`final/training.json` at the requested step count) is returned without training; an
interrupted one continues from its latest checkpoint. On CPU a run is deterministic under its seed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipelines.atomic import atomic_write_json
from pipelines.manifest import Generation, config_digest
from pipelines.ray_runtime import init_ray
from pipelines.train_data import Pair, coco_pairs, generation_pairs
from pipelines.train_loop import SUMMARY_FILE, TrainSpec, train_worker
from vlp_core.config import load_preset, preset_names
from vlp_core.tokenizer import load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

# Fields that may change when a run is restarted: how long it trains and where it runs.
RESTARTABLE_FIELDS = ("epochs", "max_steps", "num_workers", "cpus_per_worker", "use_gpu", "loader_workers",
                      "checkpoint_every", "log_every", "max_failures", "ray_address")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. BLIP trainings start from `preset` (random weights) or `init_checkpoint`."""

    # the model
    preset: str | None = None            # vlp_core preset, e.g. "tiny"
    init_checkpoint: Path | None = None  # capfilt checkpoint folder or transformers BLIP folder
    tokenizer: Path | None = None        # with `preset`: a tokenizer folder; None trains one on the captions
    clip_model: str = "clip_tiny"        # train_clip: open_clip architecture
    # how long: exactly one of them
    epochs: int | None = None
    max_steps: int | None = None
    # optimisation
    batch_size: int = 32                 # per worker
    lr: float = 1e-4                     # peak; linear warm-up, then cosine decay to 0
    weight_decay: float = 0.05
    warmup_steps: int = 0                # learning-rate warm-up
    itc_warmup_steps: int = 0            # BLIP tasks: ITC alone first (see train_tasks.Schedule)
    easy_negative_steps: int = 0         # BLIP tasks: ITM negatives ramp from uniform to hard
    seed: int = 0
    # where and how it runs
    num_workers: int = 1                 # Ray Train workers (DDP when > 1)
    cpus_per_worker: int = 1             # CPU cores (and torch threads) each worker takes
    use_gpu: bool = False                # one GPU per worker; bf16 autocast on CUDA
    loader_workers: int = 0              # DataLoader processes per worker
    checkpoint_every: int = 500          # steps
    log_every: int = 50                  # steps
    max_failures: int = 0                # Ray Train restarts after a worker failure (resuming from checkpoints)
    ray_address: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_workers", "cpus_per_worker", "checkpoint_every", "log_every"):
            _require(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer ≥ 1")
        for name in ("warmup_steps", "itc_warmup_steps", "easy_negative_steps", "seed", "loader_workers",
                     "max_failures"):
            _require(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an integer ≥ 0")
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError(f"TrainConfig: give either epochs or max_steps, not both or neither "
                             f"(got epochs={self.epochs!r}, max_steps={self.max_steps!r})")
        for name in ("epochs", "max_steps"):
            value = getattr(self, name)
            _require(value is None or (_is_int(value) and value >= 1), name, "None or an integer ≥ 1")
        _require(isinstance(self.lr, (int, float)) and 0 < self.lr < 1, "lr", "a number in (0, 1)")
        _require(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0, "weight_decay", "≥ 0")
        _require(self.preset is None or self.init_checkpoint is None, "preset",
                 "None when init_checkpoint is set (start from one or the other)")
        _require(self.preset is None or self.preset in preset_names(), "preset", f"one of {preset_names()}")
        _require(self.tokenizer is None or self.preset is not None, "tokenizer",
                 "None unless preset is set (a checkpoint brings its own tokenizer)")
        for name in ("init_checkpoint", "tokenizer"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).resolve())
                _require(getattr(self, name).is_dir(), name, f"an existing folder (got {value})")

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, name: str, expected: str) -> None:
    if not condition:
        raise ValueError(f"TrainConfig.{name} must be {expected}")


@dataclass(frozen=True)
class TrainResult:
    """The exported model of a finished run and the loss terms of every step (rank 0's batches)."""

    checkpoint_dir: Path
    digest: str
    steps: int
    losses: list[dict[str, float]]


def pretrain(config: TrainConfig, generation: Generation, run_dir: Path) -> TrainResult:
    """Pretrain BLIP (ITC + ITM + LM) on the kept pairs of `generation`."""
    _require_blip_source(config)
    return _fit("pretrain", config, generation_pairs(generation), generation.path.parent, run_dir)


def finetune_captioner(config: TrainConfig, annotations: Path, image_root: Path, run_dir: Path) -> TrainResult:
    """Fine-tune the captioner (LM on prompt + caption) on a COCO Karpathy set."""
    _require_blip_source(config)
    return _fit("captioner", config, coco_pairs(annotations, image_root), Path(image_root), run_dir)


def finetune_filter(config: TrainConfig, annotations: Path, image_root: Path, run_dir: Path) -> TrainResult:
    """Fine-tune the filter (ITC + ITM) on a COCO Karpathy set."""
    _require_blip_source(config)
    return _fit("filter", config, coco_pairs(annotations, image_root), Path(image_root), run_dir)


def train_clip(config: TrainConfig, annotations: Path, image_root: Path, run_dir: Path) -> TrainResult:
    """Train the CLIP ranker `config.clip_model` from scratch on a COCO set (independent of BLIP).

    `final/` holds `clip.safetensors` and `clip.json`; `train_tasks.load_clip_checkpoint` reads it."""
    if config.preset is not None or config.init_checkpoint is not None:
        raise ValueError("train_clip trains config.clip_model from scratch: leave preset and init_checkpoint "
                         "unset (to use a trained open_clip model, give its weights to the rank stage instead)")
    return _fit("clip", config, coco_pairs(annotations, image_root), Path(image_root), run_dir)


def _require_blip_source(config: TrainConfig) -> None:
    if config.preset is None and config.init_checkpoint is None:
        raise ValueError("TrainConfig: set preset (train from random weights) or init_checkpoint (a capfilt or "
                         "transformers BLIP folder)")


def _fit(task: str, config: TrainConfig, pairs: list[Pair], image_dir: Path, run_dir: Path) -> TrainResult:
    """Check and record the run, then train it on Ray Train unless it is already finished."""
    run_dir = Path(run_dir).resolve()
    global_batch = config.batch_size * config.num_workers
    steps_per_epoch = len(pairs) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{task}: {len(pairs)} pairs are fewer than one global batch "
                         f"(batch_size {config.batch_size} × num_workers {config.num_workers}); lower batch_size")
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    _record_run(run_dir, task, config, pairs)
    finished = _finished_result(run_dir, total_steps)
    if finished is not None:
        log.info("%s: %s already holds the model after %d steps", task, run_dir / "final", total_steps)
        return finished

    spec = TrainSpec(task=task, config=config, run_dir=run_dir, pairs=tuple(pairs),
                     image_dir=Path(image_dir).resolve(), tokenizer_dir=_tokenizer_dir(task, config, pairs, run_dir),
                     steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    log.info("%s: %d pairs, %d steps (%d per epoch) on %d worker(s) → %s", task, len(pairs), total_steps,
             steps_per_epoch, config.num_workers, run_dir)
    init_ray(config.ray_address)
    trainer = TorchTrainer(
        functools.partial(train_worker, spec),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(name=task, storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=config.max_failures)),
    )
    trainer.fit()
    result = _finished_result(run_dir, total_steps)
    if result is None:
        raise RuntimeError(f"{task}: training ended without {run_dir / 'final' / SUMMARY_FILE}; see the Ray logs")
    return result


def _record_run(run_dir: Path, task: str, config: TrainConfig, pairs: list[Pair]) -> None:
    """Write run.json on the first start; refuse a restart that would train something else."""
    settings = {k: v for k, v in config.to_dict().items() if k not in RESTARTABLE_FIELDS}
    record = {"task": task, "config": settings, "pairs": len(pairs),
              "data_digest": config_digest({"pairs": [dataclasses.astuple(p) for p in pairs]})}
    path = run_dir / "run.json"
    if not path.exists():
        atomic_write_json(path, record)
        return
    previous = json.loads(path.read_text())
    if previous != record:
        changed = sorted(k for k in record if previous.get(k) != record[k])
        if "config" in changed:
            changed = [f"config.{k}" for k in sorted(settings) if previous["config"].get(k) != settings[k]]
        raise ValueError(f"{run_dir} holds a run with other settings or data ({', '.join(changed)} differ); "
                         "use a new run_dir, or restore the settings to resume it")


def _finished_result(run_dir: Path, total_steps: int) -> TrainResult | None:
    summary_path = run_dir / "final" / SUMMARY_FILE
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    if summary["steps"] != total_steps:
        return None
    return TrainResult(run_dir / "final", summary["digest"], summary["steps"], summary["history"])


def _tokenizer_dir(task: str, config: TrainConfig, pairs: list[Pair], run_dir: Path) -> Path | None:
    """The tokenizer of a BLIP model built from a preset: the given one, or one trained on the captions
    (with the model's prompt) and kept in run_dir/tokenizer, so a restart uses the same vocabulary."""
    if task == "clip" or config.preset is None:
        return None
    model_config = load_preset(config.preset)
    folder = config.tokenizer or run_dir / "tokenizer"
    if not folder.is_dir():
        tokenizer = train_tokenizer([model_config.prompt, *(p.caption for p in pairs)],
                                    vocab_size=model_config.text.vocab_size)
        staging = run_dir / ".tokenizer.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer.save_pretrained(str(staging))
        os.replace(staging, folder)
    vocabulary = len(load_tokenizer(folder))
    if vocabulary > model_config.text.vocab_size:
        raise ValueError(f"tokenizer {folder} has {vocabulary} tokens, more than preset {config.preset!r}'s "
                         f"text.vocab_size {model_config.text.vocab_size}; use a smaller vocabulary or another preset")
    return folder
