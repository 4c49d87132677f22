"""Training stages: pretrain BLIP, fine-tune the captioner and the filter, train the CLIP ranker.

Each entry point turns its input into (image, caption) pairs, checks the run folder, and runs the one
training loop (`pipelines.training.loop.train_loop`): on a Ray Train `TorchTrainer` with `num_workers`
workers (DDP when more than one), or in this process (`TrainConfig.trains_in_process`: the local executor,
or one worker that Ray Train would only start up), or in a child process of its own (`child_process`, so
that two such trainings run side by side). Results land in `run_dir`:

    run.json            what this run trains (task, config, data digest); a restart must match it
    pairs.arrow         the pairs it trains on, streamed from its input once per start (`data.write_pairs`)
    tokenizer/          BLIP from a preset without a tokenizer: WordPiece trained on the captions
    checkpoints/step-N/ resumable checkpoints;  final/  the exported model + training.json

A finished run (`final/training.json` at the requested step count) is returned without training; an
interrupted one continues from its latest checkpoint. On CPU a run repeats itself exactly under its seed and
number of threads (`loop.train_loop` uses torch's deterministic kernels there); on another number of threads
its sums round differently (weights 5e-4 apart after 150 tiny pretraining steps on 1 thread against 2).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import logging.handlers
import multiprocessing
import threading
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import torch

from pipelines.executor import init_ray
from pipelines.manifests.manifest import Generation
from pipelines.progress import ProgressReplay, ProgressSender, listen_to_progress
from pipelines.training.config import RESTARTABLE_FIELDS, TrainConfig
from pipelines.training.data import PAIR_FILE, PairFile, coco_triples, generation_triples, write_pairs
from pipelines.training.loop import SUMMARY_FILE, Placement, TrainSpec, train_loop
from vlp_core.atomic import atomic_directory, atomic_write_json
from vlp_core.checkpoint import file_digest
from vlp_core.config import load_preset
from vlp_core.storage import Location, absolute, location
from vlp_core.tokenizer import TOKENIZER_COMMIT, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """The exported model of a finished run and the loss terms of every step (rank 0's batches)."""

    checkpoint_dir: Location
    digest: str
    steps: int
    losses: list[dict[str, float]]


def pretrain(config: TrainConfig, generation: Generation, run_dir: Location) -> TrainResult:
    """Pretrain BLIP (ITC + ITM + LM) on the kept pairs of `generation`."""
    _require_blip_source(config)
    return _fit(
        "pretrain", config, generation_triples(generation), str(generation.path), generation.path.parent, run_dir
    )


def finetune_captioner(
    config: TrainConfig, annotations: Location, image_root: Location, run_dir: Location
) -> TrainResult:
    """Fine-tune the captioner (LM on prompt + caption) on a COCO Karpathy set."""
    _require_blip_source(config)
    return _fit("captioner", config, coco_triples(annotations, image_root), str(annotations), image_root, run_dir)


def finetune_filter(config: TrainConfig, annotations: Location, image_root: Location, run_dir: Location) -> TrainResult:
    """Fine-tune the filter (ITC + ITM) on a COCO Karpathy set."""
    _require_blip_source(config)
    return _fit("filter", config, coco_triples(annotations, image_root), str(annotations), image_root, run_dir)


def train_clip(config: TrainConfig, annotations: Location, image_root: Location, run_dir: Location) -> TrainResult:
    """Train the CLIP ranker `config.clip_model` from scratch on a COCO set (independent of BLIP).

    `final/` holds `clip.safetensors` and `clip.json`; `training.tasks.load_clip_checkpoint` reads it."""
    if config.preset is not None or config.init_checkpoint is not None:
        raise ValueError(
            "train_clip trains config.clip_model from scratch: leave preset and init_checkpoint "
            "unset (to use a trained open_clip model, give its weights to the rank stage instead)"
        )
    return _fit("clip", config, coco_triples(annotations, image_root), str(annotations), image_root, run_dir)


def _require_blip_source(config: TrainConfig) -> None:
    if config.preset is None and config.init_checkpoint is None:
        raise ValueError(
            "TrainConfig: set preset (train from random weights) or init_checkpoint (a capfilt or "
            "transformers BLIP folder)"
        )


def _fit(
    task: str,
    config: TrainConfig,
    triples: Iterable[tuple[str, str, str | None]],
    source: str,
    image_dir: Location,
    run_dir: Location,
) -> TrainResult:
    """Write the pairs (image_id, image_ref, caption `triples` read from `source`), check and record the
    run, then train it unless it is already finished."""
    run_dir = absolute(location(run_dir))
    pairs = write_pairs(triples, run_dir / PAIR_FILE, source)
    global_batch = config.batch_size * config.num_workers
    steps_per_epoch = len(pairs) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"{task}: {len(pairs)} pairs are fewer than one global batch "
            f"(batch_size {config.batch_size} × num_workers {config.num_workers}); lower batch_size"
        )
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    _record_run(run_dir, task, config, pairs)
    finished = _finished_result(run_dir, total_steps)
    if finished is not None:
        log.info("%s: %s already holds the model after %d steps", task, run_dir / "final", total_steps)
        return finished

    spec = TrainSpec(
        task=task,
        config=config,
        run_dir=run_dir,
        pairs=pairs,
        image_dir=absolute(location(image_dir)),
        tokenizer_dir=_tokenizer_dir(task, config, pairs, run_dir),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )
    if not config.trains_in_process:
        where, train = f"on {config.num_workers} Ray Train worker(s)", _train_on_ray
    elif config.child_process:
        where, train = "in a child process", _train_in_child
    else:
        where, train = "in this process", _train_here
    log.info(
        "%s: %d pairs, %d steps (%d per epoch) %s → %s", task, len(pairs), total_steps, steps_per_epoch, where, run_dir
    )
    train(spec)
    result = _finished_result(run_dir, total_steps)
    if result is None:
        raise RuntimeError(f"{task}: training ended without {run_dir / 'final' / SUMMARY_FILE}; see the logs")
    return result


def _train_here(spec: TrainSpec) -> None:
    """One worker in this process (`TrainConfig.trains_in_process`), on its GPU if `use_gpu`. The caller's torch
    threads, deterministic-kernel setting and random state are restored afterwards."""
    if spec.config.use_gpu and not torch.cuda.is_available():
        raise ValueError(
            "TrainConfig.use_gpu is set, but this process (where a single worker trains) sees no CUDA device"
        )
    device = torch.device("cuda" if spec.config.use_gpu else "cpu")
    threads = torch.get_num_threads()
    deterministic, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            train_loop(spec, Placement(device=device))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _train_in_child(spec: TrainSpec) -> None:
    """`_train_here` in a fresh child process (spawned: no copy of this process's threads or Ray state). Its
    log records go to this process's loggers and its progress to this process's listener; an exception in
    it is raised here, and its death (a stop signal, the kernel's out-of-memory killer) as a RuntimeError."""
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    forwarder = threading.Thread(target=_forward_events, args=(events,), name="child-training-events", daemon=True)
    forwarder.start()
    try:
        level = logging.getLogger(__name__).getEffectiveLevel()
        with ProcessPoolExecutor(1, mp_context=context, initializer=_send_events, initargs=(events, level)) as child:
            child.submit(_train_here, spec).result()
    except BrokenProcessPool as error:
        raise RuntimeError(
            f"{spec.task}: its training process ended abruptly (stopped, or killed, e.g. out of memory); "
            "the same command again resumes from its last checkpoint"
        ) from error
    finally:
        events.put(None)
        forwarder.join()


def _send_events(events: multiprocessing.Queue, level: int) -> None:
    """In the child: put every log record at `level` or above, and every progress event, on `events`."""
    root = logging.getLogger()
    root.handlers = [logging.handlers.QueueHandler(events)]
    root.setLevel(level)
    listen_to_progress(ProgressSender(events))


def _forward_events(events: multiprocessing.Queue) -> None:
    """In this process: hand the child's log records to the loggers of their names and its progress to this
    process's listener, until None arrives."""
    progress = ProgressReplay()
    while (event := events.get()) is not None:
        if isinstance(event, logging.LogRecord):
            logger = logging.getLogger(event.name)
            if logger.isEnabledFor(event.levelno):
                logger.handle(event)
        else:
            progress.replay(event)


def _train_on_ray(spec: TrainSpec) -> None:
    """The Ray executor: a `TorchTrainer` with `num_workers` workers (DDP when more than one). Ray Train is
    imported here: a training in this process or its child does not pay for it (1.7 s)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = spec.config
    init_ray(config.ray_address)
    trainer = TorchTrainer(
        functools.partial(_ray_train_worker, spec),
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker={"CPU": config.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=spec.task,
            storage_path=str(spec.run_dir / "ray"),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
    )
    trainer.fit()


def _ray_train_worker(spec: TrainSpec) -> None:
    """Ray Train's `train_loop_per_worker`: the training loop, placed by Ray Train."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    train_loop(
        spec,
        Placement(
            rank=context.get_world_rank(),
            world_size=context.get_world_size(),
            device=ray.train.torch.get_device(),
            prepare_model=lambda model, find_unused_parameters: ray.train.torch.prepare_model(
                model, parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters}
            ),
            prepare_loader=lambda loader: ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False),
        ),
    )


def _record_run(run_dir: Location, task: str, config: TrainConfig, pairs: PairFile) -> None:
    """Write run.json on the first start; refuse a restart that would train something else."""
    settings = {k: v for k, v in config.to_dict().items() if k not in RESTARTABLE_FIELDS}
    record = {"task": task, "config": settings, "pairs": len(pairs), "data_digest": file_digest(pairs.path)}
    path = run_dir / "run.json"
    if not path.exists():
        atomic_write_json(path, record)
        return
    previous = json.loads(path.read_text())
    if previous != record:
        changed = sorted(k for k in record if previous.get(k) != record[k])
        if "config" in changed:
            changed = [f"config.{k}" for k in sorted(settings) if previous["config"].get(k) != settings[k]]
        raise ValueError(
            f"{run_dir} holds a run with other settings or data ({', '.join(changed)} differ); "
            "use a new run_dir, or restore the settings to resume it"
        )


def _finished_result(run_dir: Location, total_steps: int) -> TrainResult | None:
    summary_path = run_dir / "final" / SUMMARY_FILE
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    if summary["steps"] != total_steps:
        return None
    return TrainResult(run_dir / "final", summary["digest"], summary["steps"], summary["history"])


def _tokenizer_dir(task: str, config: TrainConfig, pairs: PairFile, run_dir: Location) -> Location | None:
    """The tokenizer of a BLIP model built from a preset: the given one, or one trained on the captions
    (with the model's prompt) and kept in run_dir/tokenizer, so a restart uses the same vocabulary."""
    if task == "clip" or config.preset is None:
        return None
    model_config = load_preset(config.preset)
    folder = config.tokenizer or run_dir / "tokenizer"
    if config.tokenizer is None and not (folder / TOKENIZER_COMMIT[0]).is_file():
        tokenizer = train_tokenizer(
            itertools.chain([model_config.prompt], pairs.captions()), vocab_size=model_config.text.vocab_size
        )
        with atomic_directory(folder, commit=TOKENIZER_COMMIT) as staging:
            tokenizer.save_pretrained(str(staging))
    vocabulary = len(load_tokenizer(folder))
    if vocabulary > model_config.text.vocab_size:
        raise ValueError(
            f"tokenizer {folder} has {vocabulary} tokens, more than preset {config.preset!r}'s "
            f"text.vocab_size {model_config.text.vocab_size}; use a smaller vocabulary or another preset"
        )
    return folder
