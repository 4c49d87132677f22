"""Dataset-quality report of one generation: the figures a data engineer reads to judge it.

`report_figures(inputs)` is a pure function of what `read_report_inputs` gathers: the generation's rows,
its generation.json, the settings its stages recorded in their shard markers (ITM threshold, CLIP
top-k), every ancestor's generation.json and evaluation.json, on a synthetic world the web pairs' true
noise labels and, when an ablation ran on the generation's candidates, its ablation.json
(pipelines.stages.ablate). `write_report` writes, into `<generation>/report/` by default:

    index.html     the page (opens from disk: plots and thumbnails are relative files, no script)
    report.json    the same figures, machine-readable; identical inputs give an identical file
    plots/*.svg, plots/*.png
    thumbs/*.png   the examples' images

The folder is written aside and swapped in, so a reader sees the old report or the new one.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.manifests.manifest import CAPTION_SOURCES, Generation, ManifestError, generation_counts, manifest_digest
from pipelines.registry import FILTER, UNSCREENED_STAGES, in_stage_order
from pipelines.report.ablation_table import MEASURES, read_ablation, table_rows
from pipelines.report.metrics import decision_metrics, simple_tokenize
from pipelines.world.generate import WorldPaths, web_key
from vlp_core.atomic import atomic_directory, atomic_write_json

REPORT_DIR = "report"
REPORT_JSON = "report.json"
EVALUATION_FILE = "evaluation.json"  # written by pipelines.stages.evaluate (not imported: it pulls in torch and Ray)
SCORE_COLUMNS = {"itm": "itm_score", "clip": "clip_score"}
SCORE_BINS = 20
NGRAM_ORDERS = (1, 2, 3, 4)
N_EXAMPLES = 12
N_EXTREMES = 2  # highest- and lowest-scoring images shown first among the examples
HISTORY_METRICS = ("tr@1", "tr@5", "ir@1", "ir@5")
CAPTION_METRICS = ("bleu_4", "cider")

Figures = dict[str, Any]


@dataclass(frozen=True)
class ReportInputs:
    """Everything a report is computed from."""

    samples: pa.Table
    info: dict[str, Any]  # generation.json, with the manifest digest added
    markers: dict[str, list[dict]]  # stage -> the stats each finished shard recorded
    ancestors: list[dict[str, Any]]  # {"info", "evaluation"} per generation, the root first, this one last
    noise_by_key: dict[str, str] | None  # world web pair key -> noise type, on a synthetic world
    world_dir: str | None
    ablation: dict[str, Any] | None = None  # ablation.json of an ablation run on these candidates


# --------------------------------------------------------------------------- reading


def read_report_inputs(generation: Generation, world_dir: Path | None = None) -> ReportInputs:
    """Gather the inputs. The world defaults to the one the nearest evaluated generation of the lineage was
    evaluated on (its evaluation.json), when its ground truth is still there."""
    info = {**generation.read_info(), "manifest_digest": manifest_digest(generation)}
    ancestors = []
    number: int | None = generation.number
    while number is not None:
        ancestor = Generation(generation.root, generation.dataset, number)
        ancestor_info = info if number == generation.number else ancestor.read_info()
        ancestors.append({"info": ancestor_info, "evaluation": _read_json(ancestor.path / EVALUATION_FILE)})
        number = ancestor_info.get("parent_generation")
        if number is not None and not Generation(generation.root, generation.dataset, number).path.exists():
            break  # a derived dataset (an ablation arm) whose parent generation is in another dataset
        if any(a["info"]["generation"] == number for a in ancestors):
            raise ManifestError(f"{ancestor.info_path}: parent_generation {number} makes a cycle")
    if world_dir is None:
        world_dir = _evaluated_world(ancestors)
    return ReportInputs(
        samples=generation.read_samples(),
        info=info,
        markers={
            stage.name: [_read_json(path) for path in sorted(stage.glob("*.json"))]
            for stage in sorted((generation.path / "markers").glob("*"))
            if stage.is_dir()
        },
        ancestors=ancestors[::-1],
        noise_by_key=_noise_labels(Path(world_dir)) if world_dir is not None else None,
        world_dir=str(world_dir) if world_dir is not None else None,
        ablation=read_ablation(generation.path),
    )


def _evaluated_world(ancestors: list[dict[str, Any]]) -> Path | None:
    """The synthetic world the nearest evaluated generation was evaluated on, if its truth is still there."""
    for ancestor in ancestors:
        world = ((ancestor["evaluation"] or {}).get("config") or {}).get("world_dir")
        if world:
            return Path(world) if WorldPaths.at(Path(world)).web_noise.is_file() else None
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when there is no such file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}: not valid JSON ({error})") from None


def _noise_labels(world_dir: Path) -> dict[str, str]:
    """Web pair key -> true noise type, from the world's ground truth."""
    path = WorldPaths.at(world_dir).web_noise
    if not path.is_file():
        raise ValueError(f"{world_dir}: no ground truth at {path}; pass the synthetic world the generation came from")
    truth = pq.read_table(path, columns=["key", "noise_type"]).to_pydict()
    return dict(zip(truth["key"], truth["noise_type"]))


# --------------------------------------------------------------------------- figures


def report_figures(inputs: ReportInputs) -> Figures:
    """Every figure of the report, JSON-serialisable (see the module docstring)."""
    rows = inputs.samples.to_pylist()
    thresholds = stage_settings(inputs.markers)
    counts = generation_counts(inputs.samples)
    figures: Figures = {
        "lineage": lineage(inputs.info),
        "thresholds": thresholds,
        "counts": counts,
        "funnel": funnel(rows, inputs.info.get("stages", [])),
        "rejections": rejections(rows),
        "scores": {name: score_histograms(rows, column) for name, column in SCORE_COLUMNS.items()},
        "text": {
            source: {
                "all": text_stats(r["caption"] for r in rows if r["caption_source"] == source),
                "kept": text_stats(r["caption"] for r in rows if r["caption_source"] == source and r["kept"]),
            }
            for source in _sources(rows)
        },
        "examples": examples(rows),
        "history": history(inputs.ancestors, counts),
        "world": None,
        "ablation": ablation(inputs.ablation) if inputs.ablation is not None else None,
    }
    if inputs.noise_by_key is not None:
        figures["world"] = {"world_dir": inputs.world_dir, **world_truth(rows, inputs.noise_by_key)}
    return figures


def lineage(info: dict[str, Any]) -> dict[str, Any]:
    """The header: what the generation was built from, so that it can be rebuilt."""
    keys = (
        "dataset",
        "generation",
        "parent_generation",
        "stages",
        "checkpoints",
        "config_digest",
        "code_version",
        "flow_run_id",
        "created_at",
        "inputs",
        "manifest_digest",
    )
    return {key: info.get(key) for key in keys}


def stage_settings(markers: dict[str, list[dict]]) -> dict[str, list]:
    """The decision settings the stages recorded per shard: ITM thresholds and CLIP top-k (several values
    when shards were decided differently)."""

    def recorded(stage: str, key: str) -> list:
        return sorted({m[key] for m in markers.get(stage, []) if m and m.get(key) is not None})

    return {"itm_threshold": recorded("filter", "threshold"), "clip_top_k": recorded("rank", "top_k")}


def _sources(rows: list[dict]) -> list[str]:
    present = {row["caption_source"] for row in rows}
    return [source for source in CAPTION_SOURCES if source in present]


def funnel(rows: list[dict], stages: list[str]) -> dict[str, list[dict]]:
    """Per source, the rows still kept after each stage, in pipeline order, starting from all rows."""
    rejected = Counter((row["caption_source"], row["reject_stage"]) for row in rows if not row["kept"])
    order = in_stage_order({*stages, *(stage for _, stage in rejected if stage is not None)})
    result = {}
    for source in _sources(rows):
        left = sum(row["caption_source"] == source for row in rows)
        steps = [{"step": "candidates", "rows": left}]
        for stage in order:
            left -= rejected[(source, stage)]
            steps.append({"step": stage, "rows": left})
        result[source] = steps
    return result


def rejections(rows: list[dict]) -> list[dict[str, Any]]:
    """Rejected rows per (stage, reason, source), in pipeline order."""
    counted = Counter(
        (row["reject_stage"], row["reject_reason"], row["caption_source"]) for row in rows if not row["kept"]
    )
    order = {stage: i for i, stage in enumerate(in_stage_order({s or "" for s, _, _ in counted}))}
    return [
        {"stage": stage, "reason": reason, "source": source, "rows": n}
        for (stage, reason, source), n in sorted(
            counted.items(), key=lambda item: (order[item[0][0] or ""], str(item[0][1]), item[0][2])
        )
    ]


def score_histograms(rows: list[dict], column: str) -> dict[str, Any]:
    """Histogram (SCORE_BINS equal bins over the scores' range, [0, 1] for ITM) and summary per source."""
    by_source = {
        source: [float(row[column]) for row in rows if row["caption_source"] == source and row[column] is not None]
        for source in _sources(rows)
    }
    by_source = {source: values for source, values in by_source.items() if values}
    everything = [value for values in by_source.values() for value in values]
    if not everything:
        return {"edges": [], "by_source": {}}
    low, high = (0.0, 1.0) if column == "itm_score" else (min(everything), max(everything))
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, SCORE_BINS + 1)
    return {
        "edges": edges.tolist(),
        "by_source": {
            source: {
                "n": len(values),
                "mean": float(np.mean(values)),
                "min": min(values),
                "max": max(values),
                "counts": np.histogram(values, bins=edges)[0].tolist(),
            }
            for source, values in by_source.items()
        },
    }


def text_stats(captions: Iterable[str | None]) -> dict[str, Any]:
    """Length (words) histogram, vocabulary, distinct n-grams and duplicate rate of captions. Words are
    `metrics.simple_tokenize`'s (lower case, no punctuation); a missing caption reads as empty, and a
    duplicate is a caption whose words equal an earlier one's."""
    tokenized = [simple_tokenize(caption or "").split() for caption in captions]
    lengths = [len(words) for words in tokenized]
    ngrams = {
        n: [tuple(words[i : i + n]) for words in tokenized for i in range(len(words) - n + 1)] for n in NGRAM_ORDERS
    }
    n_captions = len(tokenized)
    return {
        "captions": n_captions,
        "empty": lengths.count(0),
        "mean_length": float(np.mean(lengths)) if lengths else None,
        "length_histogram": np.bincount(lengths).tolist() if lengths else [],
        "vocabulary": len({word for words in tokenized for word in words}),
        "distinct_ngrams": {str(n): len(set(grams)) for n, grams in ngrams.items()},
        "distinct_ngram_ratio": {
            str(n): len(set(grams)) / len(grams) if grams else None for n, grams in ngrams.items()
        },
        "duplicate_rate": 1 - len({tuple(words) for words in tokenized}) / n_captions if n_captions else None,
    }


def examples(rows: list[dict], n: int = N_EXAMPLES) -> list[dict[str, Any]]:
    """Up to `n` web images with all their captions: the N_EXTREMES highest and lowest by best ITM
    score, then the others in the order of a hash of their image id (deterministic, unbiased)."""
    by_image: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["caption_source"] in ("web", "synthetic") and row["image_ref"]:
            by_image[row["image_id"]].append(row)
    best = {
        image: max((r["itm_score"] for r in image_rows if r["itm_score"] is not None), default=None)
        for image, image_rows in by_image.items()
    }
    scored = sorted((image for image, score in best.items() if score is not None), key=lambda i: (-best[i], i))
    roles = {image: "highest" for image in scored[:N_EXTREMES]}
    roles.update({image: "lowest" for image in scored[-N_EXTREMES:] if image not in roles})
    hashed = sorted(set(by_image) - set(roles), key=lambda image: hashlib.sha256(image.encode()).hexdigest())
    picked = [*roles, *hashed][:n]
    return [
        {
            "image_id": image,
            "image_ref": by_image[image][0]["image_ref"],
            "role": roles.get(image, "sampled"),
            "best_itm_score": best[image],
            "captions": [
                _caption_entry(row)
                for row in sorted(
                    by_image[image],
                    key=lambda r: (
                        r["caption_source"] != "web",
                        not r["kept"],
                        -(r["itm_score"] or 0.0),
                        r["sample_id"],
                    ),
                )
            ],
        }
        for image in picked
    ]


def _caption_entry(row: dict) -> dict[str, Any]:
    keys = (
        "caption_source",
        "caption",
        "kept",
        "reject_stage",
        "reject_reason",
        "itm_score",
        "clip_score",
        "clip_rank",
    )
    return {key: row[key] for key in keys}


def history(ancestors: list[dict[str, Any]], counts: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per generation of the lineage (the root first): rows, kept ratio, retrieval recalls
    (BLIP's ITM re-rank) and caption metrics of the model trained on it, None where not evaluated.
    The last entry's counts are this generation's rows as they are now."""
    table = []
    for index, ancestor in enumerate(ancestors):
        rows, kept = itemgetter("rows", "kept")(counts if index == len(ancestors) - 1 else ancestor["info"]["counts"])
        evaluation = ancestor["evaluation"] or {}
        world = evaluation.get("world") or {}
        table.append(
            {
                "generation": ancestor["info"]["generation"],
                "rows": rows,
                "kept": kept,
                "kept_ratio": kept / rows if rows else None,
                "evaluated": bool(evaluation),
                **{key: evaluation.get("retrieval", {}).get(key) for key in HISTORY_METRICS},
                **{key: (evaluation.get("captioning") or {}).get(key) for key in CAPTION_METRICS},
                "filter_precision": (world.get("filter") or {}).get("precision"),
                "filter_recall": (world.get("filter") or {}).get("recall"),
            }
        )
    return table


def ablation(summary: dict[str, Any]) -> dict[str, Any]:
    """The ablation run on this generation's candidates (pipelines.report.ablation_table): one row per arm with
    the spread of every measure over the seeds, the filter's precision/recall per arm, and the settings."""
    settings = summary["settings"]
    return {
        "seeds": summary["seeds"],
        "measures": MEASURES,
        "rows": table_rows(summary),
        "filter": [
            {
                "name": arm["arm"]["name"],
                "precision": (arm["data"]["filter"] or {}).get("precision"),
                "recall": (arm["data"]["filter"] or {}).get("recall"),
            }
            for arm in summary["arms"]
        ],
        "settings": {
            key: settings.get(key)
            for key in ("pretrain_steps", "batch_size", "model_preset", "itm_threshold", "top_k", "num_captions")
        },
        "noise_rates": (summary["world"] or {}).get("noise_rates"),
    }


def world_truth(rows: list[dict], noise_by_key: dict[str, str]) -> dict[str, Any]:
    """The web pairs' decisions against their true noise type: removal precision/recall of the filter
    and of all stages per noise type, and the noise type × decision table (`metrics.decision_metrics`)."""
    web = [row for row in rows if row["caption_source"] == "web"]
    unknown = [row["url"] for row in web if web_key(row["url"] or "") not in noise_by_key]
    if unknown:
        raise ValueError(
            f"{len(unknown)} web row(s) have URLs that are not pairs of the given world "
            f"(e.g. {unknown[0]}); pass the world the generation was downloaded from"
        )
    noise = [noise_by_key[web_key(row["url"])] for row in web]
    decisions = ["kept" if row["kept"] else row["reject_stage"] for row in web]
    return decision_metrics(noise, decisions, FILTER.name, unscreened=UNSCREENED_STAGES)


# --------------------------------------------------------------------------- writing


def default_report_dir(generation: Generation) -> Path:
    return generation.path / REPORT_DIR


def write_report(generation: Generation, out_dir: Path | None = None, world_dir: Path | None = None) -> Path:
    """Write the report of `generation` into `out_dir` (default `<generation>/report/`), replacing an
    earlier report there; returns the path of its index.html. `world_dir` defaults to the world named
    by the generation's evaluation.json, if any."""
    from pipelines.report.page import render_page  # matplotlib and Jinja2 only when writing

    out_dir = Path(out_dir) if out_dir is not None else default_report_dir(generation)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / REPORT_JSON).is_file():
        raise ValueError(f"{out_dir} holds files but no {REPORT_JSON}; give an empty or new folder for the report")
    figures = report_figures(read_report_inputs(generation, world_dir))
    with atomic_directory(out_dir) as staging:
        render_page(figures, generation, staging)
        atomic_write_json(staging / REPORT_JSON, figures)
    return out_dir / "index.html"
