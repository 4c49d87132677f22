"""The CapFilt bootstrapping loop as a Prefect flow. Each task is one stage call; the stages own resume.

    download → pretrain(gen 0) → evaluate → report → artifact
    round r = 1..R:  fine-tune captioner ∥ fine-tune filter  (from the model pretrained on gen r-1),
                     then the CLIP ranker in the captioner's lane (round 1)
                     → caption → filter → CLIP-rank → assemble gen r → pretrain(gen r) → evaluate → report
                     → artifact

Re-running a crashed flow with the same inputs and settings skips finished work: every training run
lives in a folder named by the digest of its settings and input manifest, and the per-sample stages
skip the shards their completion markers cover.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from flows.settings import RUN_PRESETS, RunSettings
from flows.tasks import retry_unless_input_error, stage_task
from pipelines.manifests.manifest import Generation, config_digest, manifest_digest
from pipelines.progress import announce
from pipelines.registry import CAPTION, FILTER, RANK
from pipelines.report import report
from pipelines.stages import assemble, caption, download, evaluate, rank
from pipelines.stages import filter as filtering
from pipelines.stopping import reclaim_sigterm
from pipelines.training import stages as train
from pipelines.training.config import TrainConfig, trains_in_process
from pipelines.training.tasks import CLIP_WEIGHTS_FILE
from pipelines.world.generate import WorldPaths, make_world
from vlp_core.captioners import captioner_digest
from vlp_core.checkpoint import checkpoint_digest, file_digest
from vlp_core.storage import Location, absolute, location

DATASET = "web"


@dataclass(frozen=True)
class Inputs:
    """What a run reads: web URLs, a human-annotated COCO set, a held-out COCO set (None when nothing is
    trained, so nothing is evaluated)."""

    url_list: Location | None  # None with world_dir: the world's own server
    human_annotations: Location
    human_image_root: Location
    test_annotations: Location | None
    test_image_root: Location | None
    world_dir: Location | None = None  # a synthetic world: its URLs are served, its truth evaluated
    download_config: download.DownloadConfig = field(default_factory=download.DownloadConfig)

    @classmethod
    def of_world(cls, paths: WorldPaths, fetch: download.DownloadConfig) -> Inputs:
        return cls(
            None, paths.human_annotations, paths.human_root, paths.test_annotations, paths.test_root, paths.root, fetch
        )


RETRIES = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": retry_unless_input_error}
download_task = stage_task(download.download, name="download", **RETRIES)
download_world_task = stage_task(download.download_world, name="download", **RETRIES)
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
    filter_scorer: str | None = None,
    itm_threshold: float | None = None,
    clip_threshold: float | None = None,
    best_per_image: int | None = None,
    top_k: int | None = None,
    clip_model: str | None = None,
    clip_checkpoint: str | None = None,
    captioner_checkpoint: str | None = None,
    captioner_backend: str | None = None,
    caption_prompt: str | None = None,
    filter_checkpoint: str | None = None,
    train_cpus: int | None = None,
    num_gpus: float | None = None,
    inference_batch_size: int | None = None,
    executor: str | None = None,
    ray_address: str | None = None,
    world_seed: int = 0,
    n_web: int | None = None,
    n_test: int | None = None,
    download_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run CapFilt for `rounds` rounds. Without `url_list`, a synthetic world is made and served. Given a
    captioner (of `captioner_backend`: blip, blip2, instructblip, llava or coca) and a filter (or the clip
    `filter_scorer`), it runs one round that trains no BLIP model. `download_options` sets
    the download's options by name (`DownloadConfig`: threads, processes, image_size, samples_per_shard,
    allowed_networks, ...)."""
    reclaim_sigterm()
    settings, inputs, out = run_setup(locals())
    return bootstrap(settings, inputs, out)


def run_setup(parameters: Mapping[str, Any], evaluates: bool | None = None) -> tuple[RunSettings, Inputs, Location]:
    """A flow's settings, inputs and resolved run folder, from its parameters (by name): the settings are
    its `preset` with every parameter that names a RunSettings field and is not None; the inputs are the
    URL list and the two COCO sets, or a synthetic world made under `out_dir` (of `world_seed`, `n_web`
    web pairs and `n_test` held-out images) when there is no `url_list`. The held-out set is needed when
    the flow `evaluates` (None: when it trains a model)."""
    preset, out = parameters["preset"], absolute(location(parameters["out_dir"]))
    if preset not in RUN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(RUN_PRESETS)}")
    setting_names = {field.name for field in fields(RunSettings)}
    overrides = {name: value for name, value in parameters.items() if name in setting_names and value is not None}
    settings = replace(RUN_PRESETS[preset], **overrides)
    fetch = download_config(parameters.get("download_options"))
    if parameters.get("url_list") is None:
        sizes = {name: parameters.get(name) for name in ("n_web", "n_test")}
        world = replace(
            settings.world,
            seed=parameters["world_seed"],
            **{name: value for name, value in sizes.items() if value is not None},
        )
        return settings, Inputs.of_world(make_world(out / "world", world), fetch), out
    sets = {name: parameters.get(name) for name in ("human_annotations", "human_image_root")}
    tests = {name: parameters.get(name) for name in ("test_annotations", "test_image_root")}
    evaluates = not settings.trains_nothing if evaluates is None else evaluates
    missing = [name for name, value in (sets | (tests if evaluates else {})).items() if value is None]
    if missing:
        raise ValueError(f"with a url_list, also give {', '.join(missing)} (the human-annotated and held-out sets)")
    paths = [None if value is None else location(value) for value in (sets | tests).values()]
    return settings, Inputs(location(parameters["url_list"]), *paths, download_config=fetch), out


def bootstrap(settings: RunSettings, inputs: Inputs, out: Location) -> dict[str, Any]:
    """The loop itself, readable top to bottom; returns where everything is and the metrics per generation."""
    logger = get_run_logger()
    root = out / "data_manifests"
    web = download_web(inputs, Generation(root, DATASET, 0))
    if settings.trains_nothing:
        announce(logger, "a given captioner and filter: one CapFilt round, no BLIP model trained or evaluated")
        target = Generation(root, DATASET, 1)
        capfilt_round(settings, inputs, out, None, web, target)
        reports = {
            generation.number: report_task(generation, world_dir=inputs.world_dir) for generation in (web, target)
        }
        for generation in (web, target):
            publish_generation(generation, {}, reports[generation.number])
        return {"manifests": str(root), "metrics": {}, "reports": {n: str(path) for n, path in reports.items()}}

    pretraining = pretrain_config(settings)
    model = pretrain_task(pretraining, web, training_dir(out, "pretrain", pretraining, manifest_digest(web)))
    metrics = {0: evaluate_task(evaluation_config(settings, inputs, model), web)}
    reports = {0: report_task(web, world_dir=inputs.world_dir)}
    publish_generation(web, metrics[0], reports[0])

    for round_number in range(1, settings.rounds + 1):
        announce(logger, "round %d: CapFilt with the model pretrained on generation %d", round_number, round_number - 1)
        target = Generation(root, DATASET, round_number)
        capfilt_round(settings, inputs, out, model, web, target)
        model = pretrain_task(pretraining, target, training_dir(out, "pretrain", pretraining, manifest_digest(target)))
        metrics[round_number] = evaluate_task(evaluation_config(settings, inputs, model), target)
        reports[round_number] = report_task(target, world_dir=inputs.world_dir)
        publish_generation(target, metrics[round_number], reports[round_number])

    logger.info("manifests: %s; reports: %s", root, ", ".join(str(page) for page in reports.values()))
    return {"manifests": str(root), "metrics": metrics, "reports": {n: str(path) for n, path in reports.items()}}


def download_config(options: Mapping[str, Any] | None) -> download.DownloadConfig:
    """The download settings a flow was given by name (`DownloadConfig`'s fields), checked before any work."""
    known = {item.name for item in fields(download.DownloadConfig)}
    unknown = sorted(set(options or {}) - known)
    if unknown:
        raise ValueError(f"download_options: unknown setting(s) {unknown}; known: {sorted(known)}")
    return download.DownloadConfig(**(options or {}))


def download_web(inputs: Inputs, web: Generation) -> Generation:
    """Generation 0: the web pairs (the world's own server when no URL list is given)."""
    if inputs.world_dir is not None:
        download_world_task(inputs.download_config, inputs.world_dir, web)
    else:
        download_task(inputs.download_config, inputs.url_list, web)
    return web


def pretrain_config(settings: RunSettings, seed: int | None = None) -> TrainConfig:
    """BLIP pretraining from the preset's random weights (ITC alone for the settings' warm-up steps, if any)."""
    return replace(
        _training(
            settings,
            settings.pretrain_steps,
            preset=settings.model_preset,
            itc_warmup_steps=settings.itc_warmup_steps,
            easy_negative_steps=settings.easy_negative_steps,
        ),
        seed=settings.seed if seed is None else seed,
    )


@dataclass(frozen=True)
class ModelRef:
    """A BLIP model a stage reads: its folder and the digest that names it in manifests."""

    checkpoint_dir: Location
    digest: str


@dataclass(frozen=True)
class RoundModels:
    """What a CapFilt round scores with: its captioner, its filter (None for the clip scorer) and the weights
    of its CLIP ranker."""

    captioner: ModelRef
    filter: ModelRef | None
    clip_weights: Location


def round_models(settings: RunSettings, inputs: Inputs, out: Location, model: train.TrainResult | None) -> RoundModels:
    """A round's models: the given ones, and the others trained on the human pairs (the captioner and the
    filter fine-tuned from `model`, the CLIP ranker `clip_model` from scratch), side by side where
    `trainings_at_once` allows; the ranker goes last, in the captioner's lane (`run_trainings`; at the tiny
    preset's steps, the captioner's fine-tuning ends first), and later rounds find it trained."""
    given = {"captioner": settings.captioner_checkpoint}
    if settings.filter_scorer == "itm":
        given["filter"] = settings.filter_checkpoint
    digests = {
        "captioner": lambda path: captioner_digest(settings.captioner_backend, path),
        "filter": checkpoint_digest,
    }
    models = {role: ModelRef(path, digests[role](path)) for role, path in given.items() if path is not None}
    tasks = {"captioner": finetune_captioner_task, "filter": finetune_filter_task, "clip": train_clip_task}
    trainings = {  # role: (its training config, the digest of what it starts from)
        role: (
            _training(settings, steps, lr=settings.finetune_lr, init_checkpoint=model.checkpoint_dir),
            model.digest,
        )
        for role, steps in (("captioner", settings.captioner_steps), ("filter", settings.filter_steps))
        if role in given and role not in models
    }
    if settings.clip_checkpoint is None:
        trainings["clip"] = (_training(settings, settings.clip_steps), file_digest(inputs.human_annotations))
    at_once = trainings_at_once(settings) if len(trainings) > 1 else 1
    human = (inputs.human_annotations, inputs.human_image_root)
    calls = [
        (tasks[role], (placed(settings, config, at_once), *human, training_dir(out, role, config, start)))
        for role, (config, start) in trainings.items()
    ]
    trained = dict(zip(trainings, run_trainings(calls, at_once), strict=True))
    clip = trained.pop("clip", None)
    models |= trained
    return RoundModels(
        models["captioner"],
        models.get("filter"),
        settings.clip_checkpoint if clip is None else clip.checkpoint_dir / CLIP_WEIGHTS_FILE,
    )


def trainings_at_once(settings: RunSettings) -> int:
    """How many independent trainings run side by side: two, each on half of `train_cpus`, on Ray Train or in
    child processes of this one (torch's threads and random state are process-wide); one (they take turns in
    this process) with one core, or on this machine's GPU. On 2 CPU cores two tiny pretrainings side by side
    took 1.2-1.5x less time than in turn, by the hour: a second thread speeds one training up far less than 2x."""
    in_process = trains_in_process(settings.executor, ray_address=settings.ray_address)
    return 2 if not in_process or (settings.train_cpus > 1 and not settings.num_gpus) else 1


def placed(settings: RunSettings, config: TrainConfig, at_once: int) -> TrainConfig:
    """`config` for a training that runs beside `at_once - 1` others: on its share of `train_cpus`, in a
    child process when it trains in this one. Placement does not change a training's folder; on another
    number of threads its sums round differently (weights 5e-4 apart after 150 tiny pretraining steps)."""
    if at_once == 1:
        return config
    return replace(
        config,
        cpus_per_worker=max(1, settings.train_cpus // at_once),
        child_process=trains_in_process(settings.executor, ray_address=settings.ray_address),
    )


def run_trainings(calls: list[tuple[Any, tuple]], at_once: int) -> list[train.TrainResult]:
    """Each (training task, its arguments), `at_once` at a time in lanes (call i starts when call
    i - at_once has ended); one at a time, in this thread. Returns their results in order."""
    if at_once == 1:
        return [training(*arguments) for training, arguments in calls]
    futures: list[Any] = []
    for index, (training, arguments) in enumerate(calls):
        ahead = futures[index - at_once : index - at_once + 1] if index >= at_once else []
        futures.append(training.submit(*arguments, wait_for=ahead))
    return [future.result() for future in futures]


def capfilt_round(
    settings: RunSettings,
    inputs: Inputs,
    out: Location,
    model: train.TrainResult | None,
    web: Generation,
    target: Generation,
) -> RoundModels:
    """One CapFilt round: a captioner, a filter and a CLIP ranker (given, or trained: `round_models`), caption
    `web` into `target`, filter, CLIP-rank, and assemble `target` with the human pairs; returns the models."""
    human = (inputs.human_annotations, inputs.human_image_root)
    models = round_models(settings, inputs, out, model)
    captioner, filter_model, clip_weights = models.captioner, models.filter, models.clip_weights
    pool = inference_pool(settings)
    caption_task(
        caption.CaptionConfig(
            checkpoint=captioner.checkpoint_dir,
            backend=settings.captioner_backend,
            prompt=settings.caption_prompt,
            num_captions=settings.num_captions,
            seed=settings.seed,
            **pool,
        ),
        web,
        target,
    )
    filter_task(filter_config(settings, filter_model, clip_weights), target)
    rank_task(
        rank.RankConfig(clip_model=settings.clip_model, clip_checkpoint=clip_weights, top_k=settings.top_k, **pool),
        target,
    )
    assemble_task(
        assemble.AssembleConfig(*human),
        target,
        target.number - 1,  # the generation its models learnt from
        checkpoints={
            **({"pretrained": model.digest} if model is not None else {}),
            "captioner": captioner.digest,
            **({"filter": filter_model.digest} if filter_model is not None else {}),
            "clip": file_digest(clip_weights),
        },
        stages=[CAPTION.name, FILTER.name, RANK.name],
        config_digest=config_digest(asdict(settings)),
        flow_run_id=_flow_run_id(),
    )
    return models


def inference_pool(settings: RunSettings) -> dict[str, Any]:
    """How the caption, filter, rank and evaluate stages run their models (`ActorPoolConfig`'s fields)."""
    return {
        "batch_size": settings.inference_batch_size,
        "concurrency": settings.concurrency,
        "num_gpus": settings.num_gpus,
        "executor": settings.executor,
        "ray_address": settings.ray_address,
    }


def filter_config(
    settings: RunSettings, filter_model: ModelRef | None, clip_weights: Location, scorer: str | None = None
) -> filtering.FilterConfig:
    """The filter with `scorer` (default: the run's): the itm scorer reads `filter_model`, the clip scorer
    the run's CLIP ranker."""
    scorer = scorer or settings.filter_scorer
    model = (
        {"checkpoint": filter_model.checkpoint_dir}
        if scorer == "itm"
        else {"clip_model": settings.clip_model, "clip_checkpoint": clip_weights}
    )
    return filtering.FilterConfig(
        scorer=scorer,
        threshold=settings.thresholds[scorer],
        best_per_image=settings.best_per_image,
        **model,
        **inference_pool(settings),
    )


def _training(
    settings: RunSettings,
    steps: int,
    *,
    preset: str | None = None,
    init_checkpoint: Location | None = None,
    lr: float | None = None,
    itc_warmup_steps: int = 0,
    easy_negative_steps: int = 0,
) -> TrainConfig:
    """Training settings: from a preset's random weights, from a checkpoint (fine-tuning: hard ITM negatives
    from the first step), or (neither) the CLIP ranker."""
    return TrainConfig(
        preset=preset,
        init_checkpoint=init_checkpoint,
        max_steps=steps,
        batch_size=settings.batch_size,
        lr=lr or settings.lr,
        seed=settings.seed,
        itc_warmup_steps=itc_warmup_steps,
        easy_negative_steps=easy_negative_steps,
        cpus_per_worker=settings.train_cpus,
        use_gpu=settings.num_gpus > 0,
        executor=settings.executor,
        ray_address=settings.ray_address,
        checkpoint_every=max(50, steps // 4),
    )


def evaluation_config(settings: RunSettings, inputs: Inputs, model: train.TrainResult) -> evaluate.EvaluateConfig:
    return evaluate.EvaluateConfig(
        checkpoint=model.checkpoint_dir,
        test_annotations=inputs.test_annotations,
        test_image_root=inputs.test_image_root,
        world_dir=inputs.world_dir,
        k_test=settings.k_test,
        **inference_pool(settings),
    )


def training_dir(out: Location, task_name: str, config: TrainConfig, source_digest: str) -> Location:
    """A training's folder, named by its settings (not where or on how many cores it runs) and its input:
    same inputs, same folder (so it resumes)."""
    key = config_digest({"config": config.placement_free_dict(), "source": source_digest}).removeprefix("sha256:")
    return out / "train" / f"{task_name}-{key}"


def _flow_run_id() -> str | None:
    return str(runtime.flow_run.id) if runtime.flow_run.id else None


@task(cache_policy=NONE)
def publish_generation(generation: Generation, metrics: dict[str, Any], report_page: Location) -> None:
    """A Prefect artifact per generation: counts, metrics, and where the manifests, evaluation and report are."""
    info = generation.read_info()
    counts = info["counts"]
    lines = [
        f"# {generation.dataset} generation {generation.number}",
        "",
        f"Manifests: `{generation.path}`  ",
        f"Evaluation: `{generation.path / evaluate.EVALUATION_FILE}`  ",
        f"Report: `{report_page}`",
        "",
        "| source | rows | kept |",
        "|---|---|---|",
    ]
    lines += [
        f"| {source} | {rows} | {counts['kept_by_source'].get(source, 0)} |"
        for source, rows in counts["rows_by_source"].items()
    ]
    lines += ["", "| rejected (stage/reason) | rows |", "|---|---|"]
    lines += [f"| {reason} | {n} |" for reason, n in counts["rejected_by_stage_reason"].items()]
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in _flat_numbers(metrics).items()]
    create_markdown_artifact(
        "\n".join(lines),
        key=f"{generation.dataset}-gen-{generation.number}",
        description=f"CapFilt generation {generation.number}",
    )


def _flat_numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """`{"retrieval": {"tr@1": 0.5}}` → `{"retrieval.tr@1": 0.5}`, numbers only."""
    flat = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flat_numbers(value, f"{prefix}{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{name}"] = float(value)
    return flat
