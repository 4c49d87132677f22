"""The CapFilt ablation (BLIP Table 1) as a Prefect flow, composed from the bootstrapping flow's pieces.

    download → pretrain(gen 0) → one CapFilt round (its CLIP ranker trained beside its fine-tunings; the
    scored candidates, gen 1)
    → per arm: its generation from the candidates → per arm and seed: pretrain (same budget, two side by
    side where the trainings can) → per arm and seed: evaluate
    → ablation.json / ablation.md next to the candidates → their report (with the ablation section)

Two captioners are compared by a second CapFilt round with the other captioner (the same web images,
filter, ranker and seed) into dataset `web-<backend>`; each chosen arm that uses synthetic captions is
also derived from those candidates, as `<arm>_<backend>`. Two filter scorers are compared by arms that
name a scorer (`capfilt_clip`): the `score` stage adds that scorer's scores to the same candidates.

Every arm trains on rows re-decided from the same candidates, with the same pretraining budget; seeds
change the pretraining (initialisation and data order), not the candidates. A re-run reuses everything
that is finished: trainings by their content-named folders, arm generations by their markers, and
evaluations that already hold the same config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.capfilt import (
    DATASET,
    Inputs,
    capfilt_round,
    download_web,
    evaluation_config,
    filter_config,
    placed,
    pretrain_config,
    pretrain_task,
    report_task,
    run_setup,
    run_trainings,
    training_dir,
    trainings_at_once,
)
from flows.settings import RUN_PRESETS, RunSettings
from flows.tasks import stage_task
from pipelines.manifests.manifest import Generation, manifest_digest
from pipelines.report.ablation_table import ablation_summary, arm_summary, write_ablation
from pipelines.stages import ablate as ablation
from pipelines.stages.assemble import AssembleConfig
from pipelines.stages.score import run_score
from pipelines.stopping import reclaim_sigterm
from pipelines.training.stages import TrainResult
from pipelines.world.generate import load_world
from vlp_core.storage import Location, location

DEFAULT_SEEDS = (0, 1, 2)

derive_arm_task = stage_task(ablation.derive_arm, name="ablate-arm")
evaluate_once_task = stage_task(ablation.evaluate_once, name="evaluate")
score_task = stage_task(run_score, name="score")


@flow(name="capfilt-ablate")
def capfilt_ablate(
    out_dir: str = "runs/ablate",
    preset: str = "tiny",
    url_list: str | None = None,
    human_annotations: str | None = None,
    human_image_root: str | None = None,
    test_annotations: str | None = None,
    test_image_root: str | None = None,
    arms: list[str] | None = None,
    seeds: list[int] | None = None,
    num_captions: int | None = None,
    filter_scorer: str | None = None,
    itm_threshold: float | None = None,
    clip_threshold: float | None = None,
    best_per_image: int | None = None,
    top_k: int | None = None,
    pretrain_steps: int | None = None,
    batch_size: int | None = None,
    model_preset: str | None = None,
    clip_model: str | None = None,
    clip_checkpoint: str | None = None,
    captioner_checkpoint: str | None = None,
    captioner_backend: str | None = None,
    caption_prompt: str | None = None,
    filter_checkpoint: str | None = None,
    compare_captioner_backend: str | None = None,
    compare_captioner_checkpoint: str | None = None,
    compare_caption_prompt: str | None = None,
    num_gpus: float | None = None,
    inference_batch_size: int | None = None,
    train_cpus: int | None = None,
    executor: str | None = None,
    ray_address: str | None = None,
    world_seed: int = 0,
    n_web: int | None = None,
    n_test: int | None = None,
    download_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and evaluate every arm (default: BLIP's Table 1, `pipelines.stages.ablate.TABLE_1`; all:
    `ARMS`) with every seed (default 0, 1, 2) on the same inputs and budget. With a `compare_captioner_*`
    (a backend and its folder), the arms that use synthetic captions also run with that captioner's.
    Without `url_list`, a synthetic world is made and served, with the preset's `ablation_n_test` held-out
    images unless `n_test` is given."""
    parameters = locals()
    reclaim_sigterm()
    if n_test is None and preset in RUN_PRESETS:  # an unknown preset is refused by run_setup
        parameters["n_test"] = RUN_PRESETS[preset].ablation_n_test
    chosen = ablation.arms_named(list(arms) if arms is not None else list(ablation.TABLE_1))
    seeds = list(seeds) if seeds is not None else list(DEFAULT_SEEDS)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: need distinct integers, got {seeds}")
    settings, inputs, out = run_setup(parameters, evaluates=True)  # every arm is evaluated
    if settings.filter_scorer != "itm" and any(arm.scorer == "itm" for arm in chosen):
        raise ValueError("arms that decide by the itm scorer need the run's filter: use --scorer itm (the default)")
    compared = compared_captioner(
        settings, compare_captioner_backend, compare_captioner_checkpoint, compare_caption_prompt
    )
    return run_ablation(settings, inputs, out, chosen, seeds, compared)


def compared_captioner(
    settings: RunSettings, backend: str | None, checkpoint: str | None, prompt: str | None
) -> RunSettings | None:
    """The run's settings with the compared captioner instead of its own (checked before any work)."""
    if backend is None and checkpoint is None:
        return None
    if backend is None or checkpoint is None:
        raise ValueError("to compare captioners, give both compare_captioner_backend and compare_captioner_checkpoint")
    return replace(
        settings, captioner_backend=backend, captioner_checkpoint=location(checkpoint), caption_prompt=prompt
    )


def run_ablation(
    settings: RunSettings,
    inputs: Inputs,
    out: Location,
    arms: list[ablation.Arm],
    seeds: list[int],
    compared: RunSettings | None = None,
) -> dict[str, Any]:
    """The ablation, top to bottom; returns where the table, the candidates and their report are."""
    logger = get_run_logger()
    root = out / "data_manifests"
    web = download_web(inputs, Generation(root, DATASET, 0))
    model = None  # the fine-tunings' start; none is needed when the captioner and filter are given
    if not settings.trains_nothing:
        pretraining = pretrain_config(settings)
        model = pretrain_task(pretraining, web, training_dir(out, "pretrain", pretraining, manifest_digest(web)))
    candidates = Generation(root, DATASET, 1)
    clip_weights = capfilt_round(settings, inputs, out, model, web, candidates).clip_weights
    variants = [(candidates, arms)]
    if compared is not None:  # the same round with the other captioner, beside the web dataset
        backend = compared.captioner_backend
        other = Generation(root, f"{DATASET}-{backend}", 1)
        capfilt_round(compared, inputs, out, model, web, other)
        variants.append((other, [replace(arm, name=f"{arm.name}_{backend}") for arm in arms if arm.captioner]))

    human = AssembleConfig(inputs.human_annotations, inputs.human_image_root)
    arm_generations = []
    for arm_candidates, arm_list in variants:
        for scorer in sorted({arm.scorer for arm in arm_list} - {None, settings.filter_scorer}):  # compared scorers
            score_task(filter_config(settings, None, clip_weights, scorer), arm_candidates)
        for arm in arm_list:
            generation = derive_arm_task(
                arm_candidates, arm, human, settings.thresholds, settings.top_k, settings.best_per_image
            )
            arm_generations.append((arm, generation, manifest_digest(generation)))
    models = pretrain_arms(settings, out, [(generation, digest) for _, generation, digest in arm_generations], seeds)
    evaluations: dict[Location, dict[str, Any]] = {}  # by model folder: arms that keep the same pairs share it
    entries = []
    for arm, generation, digest in arm_generations:
        arm_models = {seed: models[generation.path, seed] for seed in seeds}
        entries.append(evaluate_arm(settings, inputs, arm, generation, digest, arm_models, evaluations))
    summary = ablation_summary(
        entries,
        seeds=seeds,
        settings=json.loads(json.dumps(asdict(settings), default=str)),
        candidates={
            "path": str(candidates.path),
            "manifest_digest": manifest_digest(candidates),
            "checkpoints": candidates.read_info()["checkpoints"],
            "compared": [
                {
                    "path": str(other.path),
                    "manifest_digest": manifest_digest(other),
                    "checkpoints": other.read_info()["checkpoints"],
                }
                for other, _ in variants[1:]
            ],
        },
        world=load_world(inputs.world_dir)[0].to_dict() if inputs.world_dir is not None else None,
    )
    table = write_ablation(candidates.path, summary)
    report = report_task(candidates, world_dir=inputs.world_dir)
    create_markdown_artifact(table.read_text(), key="capfilt-ablation", description="CapFilt ablation table")
    logger.info("ablation table: %s; report: %s", table, report)
    return {"table": str(table), "summary": summary, "candidates": str(candidates.path), "report": str(report)}


def pretrain_arms(
    settings: RunSettings, out: Location, generations: list[tuple[Generation, str]], seeds: list[int]
) -> dict[tuple[Location, int], TrainResult]:
    """One pretraining per arm generation (with its manifest digest) and seed, all with the same budget, two
    side by side where `trainings_at_once` allows; keyed by (generation folder, seed). Arms that keep the same
    pairs share their trainings (a training's folder is named by its settings and data)."""
    at_once = trainings_at_once(settings)
    run_dirs, calls = {}, {}
    for generation, digest in generations:
        for seed in seeds:
            config = pretrain_config(settings, seed)
            run_dir = training_dir(out, "pretrain", config, digest)
            calls.setdefault(run_dir, (pretrain_task, (placed(settings, config, at_once), generation, run_dir)))
            run_dirs[generation.path, seed] = run_dir
    get_run_logger().info("%d pretrainings for %d arm(s) x %d seed(s)", len(calls), len(generations), len(seeds))
    results = dict(zip(calls, run_trainings(list(calls.values()), at_once), strict=True))
    return {key: results[run_dir] for key, run_dir in run_dirs.items()}


def evaluate_arm(
    settings: RunSettings,
    inputs: Inputs,
    arm: ablation.Arm,
    generation: Generation,
    digest: str,
    models: dict[int, TrainResult],
    evaluations: dict[Location, dict[str, Any]],
) -> dict[str, Any]:
    """Each seed's model of the arm (whose generation has manifest `digest`) evaluated on the held-out set,
    once for all arms that share it (`evaluations`, by model folder); the arm's entry of the table."""
    runs = []
    for seed, model in models.items():
        evaluation_file = generation.path / f"evaluation-seed-{seed}.json"
        same_pairs = evaluations.get(model.checkpoint_dir)
        evaluation = evaluate_once_task(
            evaluation_config(settings, inputs, model), generation, evaluation_file, same_pairs
        )
        evaluations.setdefault(model.checkpoint_dir, evaluation)
        runs.append(
            {
                "seed": seed,
                "checkpoint": model.digest,
                "run_dir": str(model.checkpoint_dir.parent),
                "evaluation_file": str(evaluation_file),
                "evaluation": evaluation,
            }
        )
    counts = generation.read_info()["counts"]
    data = {"path": str(generation.path), "manifest_digest": digest, "counts": counts}
    return arm_summary(asdict(arm), data, runs)
