"""The CapFilt bootstrapping loop as a Prefect flow. Each task is one stage call; the stages own resume.

    download → pretrain(gen 0) → evaluate → report → artifact
    round r = 1..R:  fine-tune captioner ∥ fine-tune filter  (from the model pretrained on gen r-1)
                     → caption → filter → CLIP-rank → assemble gen r → pretrain(gen r) → evaluate → report
                     → artifact

Re-running a crashed flow with the same inputs and settings skips finished work: every training run
lives in a folder named by the digest of its settings and input manifest, and the per-sample stages
skip the shards their completion markers cover.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from pipelines import assemble, caption, download, evaluate, filter as filtering, rank, report, train
from pipelines.manifest import Generation, config_digest, manifest_digest
from pipelines.train_tasks import CLIP_WEIGHTS_FILE
from vlp_core.checkpoint import file_digest
from pipelines.world import WorldConfig, WorldPaths, make_world

DATASET = "web"


@dataclass(frozen=True)
class Inputs:
    """What a run reads: web URLs, a human-annotated COCO set, a held-out COCO set."""

    url_list: Path | None                  # None with world_dir: the world's own server
    human_annotations: Path
    human_image_root: Path
    test_annotations: Path
    test_image_root: Path
    world_dir: Path | None = None          # a synthetic world: its URLs are served, its truth evaluated

    @classmethod
    def of_world(cls, paths: WorldPaths) -> Inputs:
        return cls(None, paths.human_annotations, paths.human_root, paths.test_annotations, paths.test_root,
                   paths.root)


@dataclass(frozen=True)
class RunSettings:
    """Every knob of one bootstrapping run (a preset fills them; flow parameters override some)."""

    model_preset: str = "tiny"
    rounds: int = 1
    pretrain_steps: int = 300
    finetune_steps: int = 150
    clip_steps: int = 150
    batch_size: int = 32
    lr: float = 3e-4
    num_captions: int = 5
    itm_threshold: float = 0.5
    top_k: int = 2
    k_test: int = 8                        # evaluation: ITC candidates re-ranked by ITM per query
    clip_model: str = "clip_tiny"
    clip_checkpoint: Path | None = None    # a trained open_clip state dict; None trains clip_model here
    inference_batch_size: int = 32
    concurrency: int = 1
    num_gpus: float = 0.0
    ray_address: str | None = None
    seed: int = 0
    world: WorldConfig = WorldConfig(n_web=2000, n_human=500, n_test=100)  # made when no url_list is given


RUN_PRESETS = {
    "tiny": RunSettings(),  # the README demo
    "smoke": RunSettings(  # every stage, minimal work: for tests of the flow and its deployments
        pretrain_steps=10, finetune_steps=5, clip_steps=5, batch_size=8, num_captions=2, inference_batch_size=8,
        world=WorldConfig(n_web=60, n_human=24, n_test=12, captions_per_image=2),
    ),
}


def stage_task(function: Any, **options: Any) -> Any:
    """A Prefect task around a stage function; results are not cached by Prefect (stages resume)."""
    return task(function, cache_policy=NONE, **options)


download_task = stage_task(download.download, name="download", retries=2, retry_delay_seconds=5)
download_world_task = stage_task(download.download_world, name="download", retries=2, retry_delay_seconds=5)
pretrain_task = stage_task(train.pretrain, name="pretrain")
finetune_captioner_task = stage_task(train.finetune_captioner, name="finetune-captioner")
finetune_filter_task = stage_task(train.finetune_filter, name="finetune-filter")
train_clip_task = stage_task(train.train_clip, name="train-clip")
caption_task = stage_task(caption.run_caption, name="caption")
filter_task = stage_task(filtering.run_filter, name="filter")
rank_task = stage_task(rank.run_rank, name="rank")
assemble_task = stage_task(assemble.run_assemble, name="assemble")
evaluate_task = stage_task(evaluate.run_evaluate, name="evaluate")
report_task = stage_task(report.write_report, name="report")


@flow(name="capfilt")
def capfilt(
    out_dir: str = "runs/tiny",
    preset: str = "tiny",
    url_list: str | None = None,
    human_annotations: str | None = None,
    human_image_root: str | None = None,
    test_annotations: str | None = None,
    test_image_root: str | None = None,
    rounds: int | None = None,
    num_captions: int | None = None,
    itm_threshold: float | None = None,
    top_k: int | None = None,
    clip_checkpoint: str | None = None,
    ray_address: str | None = None,
    world_seed: int = 0,
    n_web: int | None = None,
) -> dict[str, Any]:
    """Run CapFilt for `rounds` rounds. Without `url_list`, a synthetic world is made and served."""
    overrides = {"rounds": rounds, "num_captions": num_captions, "itm_threshold": itm_threshold, "top_k": top_k,
                 "clip_checkpoint": clip_checkpoint and Path(clip_checkpoint), "ray_address": ray_address}
    if preset not in RUN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(RUN_PRESETS)}")
    settings = replace(RUN_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    out = Path(out_dir).resolve()
    if url_list is None:
        world = replace(settings.world, seed=world_seed, n_web=n_web or settings.world.n_web)
        inputs = Inputs.of_world(make_world(out / "world", world))
    else:
        inputs = Inputs(Path(url_list), Path(human_annotations), Path(human_image_root),
                        Path(test_annotations), Path(test_image_root))
    return bootstrap(settings, inputs, out)


def bootstrap(settings: RunSettings, inputs: Inputs, out: Path) -> dict[str, Any]:
    """The loop itself, readable top to bottom; returns where everything is and the metrics per generation."""
    logger = get_run_logger()
    root = out / "data_manifests"
    web = Generation(root, DATASET, 0)
    if inputs.world_dir is not None:
        download_world_task(inputs.world_dir, web, download.DownloadConfig())
    else:
        download_task(inputs.url_list, web, download.DownloadConfig())
    human = (inputs.human_annotations, inputs.human_image_root)

    if settings.clip_checkpoint is None:
        clip_config = _training(settings, settings.clip_steps)
        clip_run = train_clip_task(clip_config, *human, _run_dir(out, "clip", clip_config, file_digest(human[0])))
        clip_weights = clip_run.checkpoint_dir / CLIP_WEIGHTS_FILE
    else:
        clip_weights = settings.clip_checkpoint
    pretraining = _training(settings, settings.pretrain_steps, preset=settings.model_preset)
    model = pretrain_task(pretraining, web, _run_dir(out, "pretrain", pretraining, manifest_digest(web)))
    metrics = {0: evaluate_task(_evaluation(settings, inputs, model), web)}
    reports = {0: report_task(web, world_dir=inputs.world_dir)}
    publish_generation(web, metrics[0], reports[0])

    for round_number in range(1, settings.rounds + 1):
        logger.info("round %d: CapFilt with the model pretrained on generation %d", round_number, round_number - 1)
        finetuning = _training(settings, settings.finetune_steps, init_checkpoint=model.checkpoint_dir)
        captioner_run = finetune_captioner_task.submit(
            finetuning, *human, _run_dir(out, "captioner", finetuning, model.digest))
        filter_run = finetune_filter_task.submit(finetuning, *human, _run_dir(out, "filter", finetuning, model.digest))
        captioner, filter_model = captioner_run.result(), filter_run.result()

        target = Generation(root, DATASET, round_number)
        pool = {"batch_size": settings.inference_batch_size, "concurrency": settings.concurrency,
                "num_gpus": settings.num_gpus, "ray_address": settings.ray_address}
        caption_task(caption.CaptionConfig(checkpoint=captioner.checkpoint_dir, num_captions=settings.num_captions,
                                           seed=settings.seed, **pool), web, target)
        filter_task(filtering.FilterConfig(checkpoint=filter_model.checkpoint_dir,
                                           threshold=settings.itm_threshold, **pool), target)
        rank_task(rank.RankConfig(clip_model=settings.clip_model, clip_checkpoint=clip_weights,
                                  top_k=settings.top_k, **pool), target)
        assemble_task(
            assemble.AssembleConfig(*human), target, round_number - 1,
            checkpoints={"pretrained": model.digest, "captioner": captioner.digest, "filter": filter_model.digest,
                         "clip": file_digest(clip_weights)},
            stages=["caption", "filter", "rank"], config_digest=config_digest(asdict(settings)),
            flow_run_id=_flow_run_id(),
        )
        model = pretrain_task(pretraining, target, _run_dir(out, "pretrain", pretraining, manifest_digest(target)))
        metrics[round_number] = evaluate_task(_evaluation(settings, inputs, model), target)
        reports[round_number] = report_task(target, world_dir=inputs.world_dir)
        publish_generation(target, metrics[round_number], reports[round_number])

    logger.info("manifests: %s; reports: %s", root, ", ".join(str(path / "index.html") for path in reports.values()))
    return {"manifests": str(root), "metrics": metrics, "reports": {n: str(path) for n, path in reports.items()}}


def _training(settings: RunSettings, steps: int, *, preset: str | None = None,
              init_checkpoint: Path | None = None) -> train.TrainConfig:
    """Training settings: from a preset's random weights, from a checkpoint, or (neither) the CLIP ranker."""
    return train.TrainConfig(
        preset=preset, init_checkpoint=init_checkpoint, max_steps=steps, batch_size=settings.batch_size,
        lr=settings.lr, seed=settings.seed, use_gpu=settings.num_gpus > 0, ray_address=settings.ray_address,
        checkpoint_every=max(50, steps // 4),
    )


def _evaluation(settings: RunSettings, inputs: Inputs, model: train.TrainResult) -> evaluate.EvaluateConfig:
    return evaluate.EvaluateConfig(
        checkpoint=model.checkpoint_dir, test_annotations=inputs.test_annotations,
        test_image_root=inputs.test_image_root, world_dir=inputs.world_dir, k_test=settings.k_test,
        batch_size=settings.inference_batch_size, ray_address=settings.ray_address,
    )


def _run_dir(out: Path, task_name: str, config: train.TrainConfig, source_digest: str) -> Path:
    """A training's folder, named by its settings and its input: same inputs, same folder (so it resumes)."""
    key = config_digest({"config": config.to_dict(), "source": source_digest}).removeprefix("sha256:")
    return out / "train" / f"{task_name}-{key}"


def _flow_run_id() -> str | None:
    return str(runtime.flow_run.id) if runtime.flow_run.id else None


@task(cache_policy=NONE)
def publish_generation(generation: Generation, metrics: dict[str, Any], report_dir: Path) -> None:
    """A Prefect artifact per generation: counts, metrics, and where the manifests, evaluation and report are."""
    info = generation.read_info()
    counts = info["counts"]
    lines = [f"# {generation.dataset} generation {generation.number}", "",
             f"Manifests: `{generation.path}`  ", f"Evaluation: `{generation.path / evaluate.EVALUATION_FILE}`  ",
             f"Report: `{report_dir / 'index.html'}`", "",
             "| source | rows | kept |", "|---|---|---|"]
    lines += [f"| {source} | {rows} | {counts['kept_by_source'].get(source, 0)} |"
              for source, rows in counts["rows_by_source"].items()]
    lines += ["", "| rejected (stage/reason) | rows |", "|---|---|"]
    lines += [f"| {reason} | {n} |" for reason, n in counts["rejected_by_stage_reason"].items()]
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in _flat_numbers(metrics).items()]
    create_markdown_artifact("\n".join(lines), key=f"{generation.dataset}-gen-{generation.number}",
                             description=f"CapFilt generation {generation.number}")


def _flat_numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """`{"retrieval": {"tr@1": 0.5}}` → `{"retrieval.tr@1": 0.5}`, numbers only."""
    flat = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flat_numbers(value, f"{prefix}{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{name}"] = float(value)
    return flat
