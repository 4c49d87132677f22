"""The ablation table (BLIP Table 1): per arm, per seed measures and their spread, as JSON and Markdown.

`ablation_summary` is a pure function of the arms' generation counts and evaluations; `write_ablation`
writes `ablation.json` and `ablation.md` atomically next to the candidate generation they came from,
where the generation's report finds them. Nothing here loads a model.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from vlp_core.atomic import atomic_write_json, atomic_write_text
from vlp_core.storage import Location

ABLATION_JSON = "ablation.json"
ABLATION_MD = "ablation.md"
CANDIDATE_SOURCES = ("web", "synthetic")
# measure -> column title, in table order: the arm's data, then its models on the held-out set
MEASURES = {
    "training_pairs": "pairs",
    "kept_ratio": "kept ratio",
    "tr@1": "TR@1",
    "tr@5": "TR@5",
    "ir@1": "IR@1",
    "ir@5": "IR@5",
    "tr@1_itc": "TR@1 (ITC)",
    "ir@1_itc": "IR@1 (ITC)",
    "bleu_4": "BLEU-4",
    "cider": "CIDEr",
    "caption_accuracy": "caption acc.",
}


def seed_measures(counts: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, float | None]:
    """One model's row: held-out retrieval (ITM re-rank, and ITC alone) and captioning, caption attribute
    accuracy on a world (else None), the arm's training pairs (kept rows) and the kept share of its
    web+synthetic rows."""
    candidates = sum(counts["rows_by_source"].get(source, 0) for source in CANDIDATE_SOURCES)
    kept = sum(counts["kept_by_source"].get(source, 0) for source in CANDIDATE_SOURCES)
    accuracy = ((evaluation.get("world") or {}).get("test_caption_accuracy") or {}).get("mean")
    return {
        "training_pairs": counts["kept"],
        "kept_ratio": kept / candidates if candidates else None,
        **{key: evaluation["retrieval"][key] for key in ("tr@1", "tr@5", "ir@1", "ir@5")},
        **{f"{key}_itc": (evaluation.get("retrieval_itc") or {}).get(key) for key in ("tr@1", "ir@1")},
        **{key: (evaluation["captioning"] or {}).get(key) for key in ("bleu_4", "cider")},
        "caption_accuracy": accuracy,
    }


def spread(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation (0 for one value), min and max; all None when a value is missing."""
    if not values or any(value is None for value in values):
        return {"n": len(values), "mean": None, "std": None, "min": None, "max": None}
    array = np.asarray(values, dtype=np.float64)
    return {
        "n": len(values),
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
    }


def arm_summary(arm: dict[str, Any], generation: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """An arm's entry. `generation`: {"path", "manifest_digest", "counts"}; `runs`: one {"seed",
    "checkpoint", "run_dir", "evaluation_file", "evaluation"} per seed. The data-quality figures (filter
    precision/recall per noise type, kept caption accuracy) depend on the data only: the first run's."""
    per_seed = {str(run["seed"]): seed_measures(generation["counts"], run["evaluation"]) for run in runs}
    world = runs[0]["evaluation"].get("world") or {}
    return {
        "arm": arm,
        "generation": {key: generation[key] for key in ("path", "manifest_digest", "counts")},
        "runs": [{key: run[key] for key in ("seed", "checkpoint", "run_dir", "evaluation_file")} for run in runs],
        "per_seed": per_seed,
        "summary": {measure: spread([values[measure] for values in per_seed.values()]) for measure in MEASURES},
        "data": {key: world.get(key) for key in ("filter", "all_stages", "kept_caption_accuracy")},
    }


def ablation_summary(
    arms: list[dict[str, Any]],
    *,
    seeds: list[int],
    settings: dict[str, Any],
    candidates: dict[str, Any],
    world: dict[str, Any] | None,
) -> dict[str, Any]:
    """ablation.json: the arms (from `arm_summary`), the seeds, the run settings, the candidate generation
    (path, manifest digest, checkpoints that scored it) and the world's config with its noise rates."""
    return {
        "measures": MEASURES,
        "seeds": seeds,
        "settings": settings,
        "candidates": candidates,
        "world": world,
        "arms": arms,
    }


def table_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per arm for a table: name, its components and `MEASURES` as spreads."""
    return [
        {
            "name": arm["arm"]["name"],
            **{key: arm["arm"][key] for key in ("captioner", "filter", "rank")},
            **{measure: arm["summary"][measure] for measure in MEASURES},
        }
        for arm in summary["arms"]
    ]


def format_spread(value: dict[str, Any], measure: str) -> str:
    """'0.412 ± 0.013' (pairs as integers); '-' when missing."""
    if value["mean"] is None:
        return "-"
    if measure == "training_pairs":
        return f"{value['mean']:.0f}" if value["std"] == 0 else f"{value['mean']:.1f} ± {value['std']:.1f}"
    return f"{value['mean']:.3f} ± {value['std']:.3f}"


def ablation_markdown(summary: dict[str, Any]) -> str:
    """ablation.md: the Table-1-like table, the filter on injected noise per arm, and what produced them."""
    settings, world = summary["settings"], summary["world"]
    num_captions = settings.get("num_captions")
    tick = {True: "✓", False: ""}
    lines = [
        f"# CapFilt ablation (mean ± std over seeds {', '.join(map(str, summary['seeds']))})",
        "",
        "| arm | C | F | rank | " + " | ".join(MEASURES.values()) + " |",
        "|---|---|---|---|" + "---|" * len(MEASURES),
    ]
    for row in table_rows(summary):
        cells = [
            row["name"],
            tick[row["captioner"]],
            tick[row["filter"]],
            tick[row["rank"]],
            *(format_spread(row[measure], measure) for measure in MEASURES),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "C: synthetic captions; F: ITM filter; rank: CLIP top-k per image. Retrieval is on the held-out "
        "set (ITC, then ITM re-rank; (ITC): ITC alone, before the re-rank); kept ratio is the kept share of the "
        "web + synthetic candidates.",
    ]
    filtered = [arm for arm in summary["arms"] if (arm["data"]["filter"] or {}).get("removed")]
    if filtered:
        noise_types = sorted(filtered[0]["data"]["filter"]["by_noise_type"])
        lines += [
            "",
            "## Web pairs each arm leaves out, against the injected noise",
            "",
            "Precision: the share of the left-out web pairs that carry noise; recall: the share of the noisy "
            "web pairs left out. Arms without the filter leave out only empty captions and failed downloads.",
            "",
            "| arm | precision | recall | " + " | ".join(f"{t} removed" for t in noise_types) + " |",
            "|---|---|---|" + "---|" * len(noise_types),
        ]
        for arm in filtered:
            metrics = arm["data"]["filter"]
            rates = [
                f"{metrics['by_noise_type'][t]['removal_rate']:.2f}" if t in metrics["by_noise_type"] else "-"
                for t in noise_types
            ]
            lines.append(
                f"| {arm['arm']['name']} | {_number(metrics['precision'])} | {_number(metrics['recall'])} | "
                + " | ".join(rates)
                + " |"
            )
    lines += [
        "",
        "## Settings",
        "",
        f"- pretraining budget per model: {settings.get('pretrain_steps')} steps × batch "
        f"{settings.get('batch_size')} (model preset {settings.get('model_preset')})",
        f"- filter: {filter_rule(settings)}"
        + (
            f" (the `_clip` arms: CLIP score ≥ {settings.get('clip_threshold')})"
            if any(arm["arm"].get("scorer") == "clip" for arm in summary["arms"])
            else ""
        )
        + f", CLIP top-k {settings.get('top_k')}, "
        f"{num_captions} synthetic caption{'' if num_captions == 1 else 's'} per image "
        f"(captioner: {settings.get('captioner_backend', 'blip')})",
        f"- candidates: `{summary['candidates']['path']}` ({summary['candidates']['manifest_digest']})",
        *(
            f"- the other captioner's candidates (arms `_<backend>`): `{other['path']}` ({other['manifest_digest']})"
            for other in summary["candidates"].get("compared", [])
        ),
    ]
    if world is not None:
        lines.append(
            f"- world: seed {world.get('seed')}, {world.get('n_web')} web pairs, noise rates "
            + ", ".join(f"{name} {rate}" for name, rate in (world.get("noise_rates") or {}).items())
        )
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def write_ablation(folder: Location, summary: dict[str, Any]) -> Location:
    """Write ablation.json and ablation.md into `folder` (the candidate generation), each atomically;
    returns the Markdown file's path."""
    atomic_write_json(folder / ABLATION_JSON, summary)
    return atomic_write_text(folder / ABLATION_MD, ablation_markdown(summary))


def read_ablation(folder: Location) -> dict[str, Any] | None:
    """The ablation.json in `folder`, or None when there is none."""
    try:
        return json.loads((folder / ABLATION_JSON).read_text())
    except FileNotFoundError:
        return None


def filter_rule(settings: dict[str, Any]) -> str:
    """The filter's scorer, threshold and captions kept per image, as a run's settings record them."""
    if settings.get("filter_scorer", "itm") == "clip":
        rule = f"CLIP score ≥ {settings.get('clip_threshold')}"
    else:
        rule = f"ITM ≥ {settings.get('itm_threshold')}"
    best = settings.get("best_per_image") or 0
    return rule + (f", each image's {'best' if best == 1 else f'{best} best'}" if best else "")
