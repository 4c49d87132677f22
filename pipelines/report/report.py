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

import json
from collections import Counter
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipelines.manifests.manifest import CAPTION_SOURCES, Generation, ManifestError, manifest_digest
from pipelines.registry import FILTER, UNSCREENED_STAGES, in_stage_order
from pipelines.report.ablation_table import MEASURES, filter_rule, read_ablation, table_rows
from pipelines.report.examples import examples
from pipelines.report.metrics import WEB_DECISION_COLUMNS, decision_metrics, web_decisions
from pipelines.report.tallies import TextTally, Vocabulary
from pipelines.world.generate import WorldPaths
from vlp_core.atomic import atomic_directory, atomic_write_json
from vlp_core.storage import Location, location, read_parquet

REPORT_DIR = "report"
REPORT_JSON = "report.json"
EVALUATION_FILE = "evaluation.json"  # written by pipelines.stages.evaluate (not imported: it pulls in torch and Ray)
SCORE_COLUMNS = {"itm": "itm_score", "filter_clip": "filter_clip_score", "clip": "clip_score"}
SCORE_BINS = 20
TEXT_BATCH_ROWS = 16_384
HISTORY_METRICS = ("tr@1", "tr@5", "ir@1", "ir@5")
CAPTION_METRICS = ("bleu_4", "cider")
UNCHANGED_WITHIN = 5e-4  # a change the page shows as ±0.000 is no change

Figures = dict[str, Any]


@dataclass(frozen=True)
class ReportInputs:
    """Everything a report is computed from."""

    generation: Generation  # its rows are read part by part
    info: dict[str, Any]  # generation.json, with the manifest digest added
    markers: dict[str, list[dict]]  # stage -> the stats each finished shard recorded
    ancestors: list[dict[str, Any]]  # {"info", "evaluation"} per generation, the root first, this one last
    noise_by_key: dict[str, str] | None  # world web pair key -> noise type, on a synthetic world
    world_dir: str | None
    ablation: dict[str, Any] | None = None  # ablation.json of an ablation run on these candidates


# --------------------------------------------------------------------------- reading


def read_report_inputs(generation: Generation, world_dir: Location | None = None) -> ReportInputs:
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
        generation=generation,
        info=info,
        markers={
            stage.name: [_read_json(path) for path in sorted(stage.glob("*.json"))]
            for stage in sorted((generation.path / "markers").glob("*"))
            if stage.is_dir()
        },
        ancestors=ancestors[::-1],
        noise_by_key=_noise_labels(location(world_dir)) if world_dir is not None else None,
        world_dir=str(world_dir) if world_dir is not None else None,
        ablation=read_ablation(generation.path),
    )


def _evaluated_world(ancestors: list[dict[str, Any]]) -> Location | None:
    """The synthetic world the nearest evaluated generation was evaluated on, if its truth is still there."""
    for ancestor in ancestors:
        world = ((ancestor["evaluation"] or {}).get("config") or {}).get("world_dir")
        if world:
            return location(world) if WorldPaths.at(location(world)).web_noise.is_file() else None
    return None


def _read_json(path: Location) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when there is no such file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}: not valid JSON ({error})") from None


def _noise_labels(world_dir: Location) -> dict[str, str]:
    """Web pair key -> true noise type, from the world's ground truth."""
    path = WorldPaths.at(world_dir).web_noise
    if not path.is_file():
        raise ValueError(f"{world_dir}: no ground truth at {path}; pass the synthetic world the generation came from")
    truth = read_parquet(path, columns=["key", "noise_type"]).to_pydict()
    return dict(zip(truth["key"], truth["noise_type"]))


# --------------------------------------------------------------------------- figures


def report_figures(inputs: ReportInputs) -> Figures:
    """Every figure of the report, JSON-serialisable (see the module docstring). The rows are read part by
    part, a few columns per figure, so memory does not grow with the generation's size."""
    generation = inputs.generation
    counts = generation.counts()
    rejected = rejected_rows(generation)
    sources = [source for source in CAPTION_SOURCES if source in counts["rows_by_source"]]
    figures: Figures = {
        "lineage": lineage(inputs.info),
        "thresholds": stage_settings(inputs.markers),
        "counts": counts,
        "funnel": funnel(counts["rows_by_source"], rejected, inputs.info.get("stages", [])),
        "rejections": rejections(rejected),
        "scores": score_histograms(generation, sources),
        "text": text_figures(generation, sources),
        "examples": examples(generation),
        "history": history(inputs.ancestors, counts),
        "world": None,
        "ablation": ablation(inputs.ablation) if inputs.ablation is not None else None,
    }
    if inputs.noise_by_key is not None:
        figures["world"] = {"world_dir": inputs.world_dir, **world_truth(generation, inputs.noise_by_key)}
    figures["verdict"] = verdict(figures["history"], figures["funnel"])
    return figures


def verdict(history_table: list[dict[str, Any]], funnels: dict[str, list[dict]]) -> dict[str, Any]:
    """The page's first line: is the model trained on this generation better than its parent's on the
    held-out metrics both were evaluated on, and how many rows of each source each stage removed."""
    removed = [
        {"stage": after["step"], "source": source, "rows": before["rows"] - after["rows"]}
        for source, steps in funnels.items()
        for before, after in zip(steps, steps[1:])
        if before["rows"] > after["rows"]
    ]
    this = history_table[-1]
    parent = history_table[-2] if len(history_table) > 1 else None
    changes = {
        key: {"parent": parent[key], "this": this[key], "change": this[key] - parent[key]}
        for key in (*HISTORY_METRICS, *CAPTION_METRICS)
        if parent is not None and parent[key] is not None and this[key] is not None
    }
    better = [key for key, change in changes.items() if change["change"] >= UNCHANGED_WITHIN]
    worse = [key for key, change in changes.items() if change["change"] <= -UNCHANGED_WITHIN]
    if not changes:
        summary = "not compared: this generation and its parent were not both evaluated"
    elif not better and not worse:
        summary = f"no change against generation {parent['generation']} on the held-out metrics"
    elif not (better and worse):
        direction, keys = ("better", better) if better else ("worse", worse)
        which = (
            f"every held-out metric ({', '.join(keys)})"
            if len(keys) == len(changes)
            else f"{', '.join(keys)}; the others did not change"
        )
        summary = f"{direction} than generation {parent['generation']} on {which}"
    else:
        summary = (
            f"mixed against generation {parent['generation']}: better on {', '.join(better) or 'none'}, "
            f"worse on {', '.join(worse) or 'none'}"
        )
    return {"summary": summary, "better": better, "worse": worse, "changes": changes, "removed": removed}


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
    """The decision settings the stages recorded per shard: the filter's scorers, thresholds (ITM
    probability, CLIP cosine) and captions kept per image, and the ranker's top-k (several values when
    shards were decided differently)."""

    def recorded(stage: str, key: str, scorer: str | None = None) -> list:
        shards = [m for m in markers.get(stage, []) if m and (scorer is None or m.get("scorer", "itm") == scorer)]
        return sorted({m[key] for m in shards if m.get(key) is not None})

    return {
        "filter_scorer": sorted({m.get("scorer", "itm") for m in markers.get("filter", []) if m}),
        "itm_threshold": recorded("filter", "threshold", "itm"),
        "clip_threshold": recorded("filter", "threshold", "clip"),
        "best_per_image": recorded("filter", "best_per_image"),
        "clip_top_k": recorded("rank", "top_k"),
    }


def rejected_rows(generation: Generation) -> Counter[tuple[str, str | None, str | None]]:
    """The number of rejected rows per (source, reject stage, reject reason)."""
    counted: Counter[tuple[str, str | None, str | None]] = Counter()
    for part in generation.iter_parts(["caption_source", "kept", "reject_stage", "reject_reason"]):
        groups = part.filter(pc.invert(part["kept"])).group_by(["caption_source", "reject_stage", "reject_reason"])
        for row in groups.aggregate([("kept", "count")]).to_pylist():
            counted[(row["caption_source"], row["reject_stage"], row["reject_reason"])] += row["kept_count"]
    return counted


def funnel(
    rows_by_source: dict[str, int], rejected: Counter[tuple[str, str | None, str | None]], stages: list[str]
) -> dict[str, list[dict]]:
    """Per source, the rows still kept after each stage, in pipeline order, starting from all rows."""
    by_stage: Counter[tuple[str, str | None]] = Counter()
    for (source, stage, _), n in rejected.items():
        by_stage[(source, stage)] += n
    order = in_stage_order({*stages, *(stage for _, stage in by_stage if stage is not None)})
    result = {}
    for source in (source for source in CAPTION_SOURCES if source in rows_by_source):
        left = rows_by_source[source]
        steps = [{"step": "candidates", "rows": left}]
        for stage in order:
            left -= by_stage[(source, stage)]
            steps.append({"step": stage, "rows": left})
        result[source] = steps
    return result


def rejections(rejected: Counter[tuple[str, str | None, str | None]]) -> list[dict[str, Any]]:
    """Rejected rows per (stage, reason, source), in pipeline order."""
    order = {stage: i for i, stage in enumerate(in_stage_order({stage or "" for _, stage, _ in rejected}))}
    return [
        {"stage": stage, "reason": reason, "source": source, "rows": n}
        for (source, stage, reason), n in sorted(
            rejected.items(), key=lambda item: (order[item[0][1] or ""], str(item[0][2]), item[0][0])
        )
    ]


def score_histograms(generation: Generation, sources: list[str]) -> dict[str, dict[str, Any]]:
    """Per score (ITM, the filter's CLIP, the ranker's CLIP): a histogram (SCORE_BINS equal bins over the
    scores' range, [0, 1] for ITM) and a summary per source. Two passes: the range, then the bins."""
    columns = list(SCORE_COLUMNS.values())
    ranges: dict[str, tuple[float, float]] = {}
    for part in generation.iter_parts(columns):
        for column in columns:
            low, high = pc.min_max(part[column]).values()
            if low.is_valid:
                seen = ranges.get(column, (low.as_py(), high.as_py()))
                ranges[column] = (min(seen[0], low.as_py()), max(seen[1], high.as_py()))
    edges = {column: _score_edges(column, *ranges[column]) for column in ranges}
    tallies = {column: {source: _ScoreTally(len(edges[column]) - 1) for source in sources} for column in edges}
    if tallies:
        for part in generation.iter_parts(["caption_source", *edges]):
            for source in sources:
                rows = part.filter(pc.equal(part["caption_source"], source))
                for column, by_source in tallies.items():
                    values = rows[column].drop_null().to_numpy().astype(np.float64)
                    by_source[source].add(values, edges[column])
    return {
        name: {
            "edges": edges[column].tolist() if column in edges else [],
            "by_source": {source: tally.figures() for source, tally in tallies.get(column, {}).items() if tally.n},
        }
        for name, column in SCORE_COLUMNS.items()
    }


def _score_edges(column: str, low: float, high: float) -> np.ndarray:
    low, high = (0.0, 1.0) if column == "itm_score" else (low, high)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, SCORE_BINS + 1)


class _ScoreTally:
    """Count, sum, range and bin counts of one source's scores."""

    def __init__(self, bins: int) -> None:
        self.n, self.total, self.low, self.high = 0, 0.0, np.inf, -np.inf
        self.counts = np.zeros(bins, dtype=np.int64)

    def add(self, values: np.ndarray, edges: np.ndarray) -> None:
        if len(values):
            self.n += len(values)
            self.total += float(values.sum())
            self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))
            self.counts += np.histogram(values, bins=edges)[0]

    def figures(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "mean": self.total / self.n,
            "min": self.low,
            "max": self.high,
            "counts": self.counts.tolist(),
        }


def text_figures(generation: Generation, sources: list[str]) -> dict[str, dict[str, Any]]:
    """`tallies.TextTally` figures of every source's captions, all and kept."""
    vocabulary = Vocabulary()
    tallies = {source: {"all": TextTally(), "kept": TextTally()} for source in sources}
    for part in generation.iter_parts(["caption", "caption_source", "kept"]):
        for batch in part.to_batches(max_chunksize=TEXT_BATCH_ROWS):  # bounds the tokens held at once
            for source in sources:
                rows = batch.filter(pc.equal(batch["caption_source"], source))
                tokens = vocabulary.tokenize(rows["caption"].to_pylist())
                tallies[source]["all"].add(tokens)
                tallies[source]["kept"].add(tokens.select(rows["kept"].to_numpy(zero_copy_only=False)))
    return {source: {key: tally.figures() for key, tally in by_kept.items()} for source, by_kept in tallies.items()}


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
            **{
                key: settings.get(key)
                for key in ("pretrain_steps", "batch_size", "model_preset", "top_k", "num_captions")
            },
            "filter_rule": filter_rule(settings),
        },
        "noise_rates": (summary["world"] or {}).get("noise_rates"),
    }


def world_truth(generation: Generation, noise_by_key: dict[str, str]) -> dict[str, Any]:
    """The web pairs' decisions against their true noise type: removal precision/recall of the filter
    and of all stages per noise type, and the noise type × decision table (`metrics.decision_metrics`)."""
    decisions: Counter[tuple[str, str]] = Counter()
    for part in generation.iter_parts(WEB_DECISION_COLUMNS):
        decisions += web_decisions(part, noise_by_key)
    return decision_metrics(decisions, FILTER.name, unscreened=UNSCREENED_STAGES)


# --------------------------------------------------------------------------- writing


def default_report_dir(generation: Generation) -> Location:
    return generation.path / REPORT_DIR


def write_report(
    generation: Generation, out_dir: Location | None = None, world_dir: Location | None = None
) -> Location:
    """Write the report of `generation` into `out_dir` (default `<generation>/report/`), replacing an
    earlier report there; returns the path of its index.html. `world_dir` defaults to the world named
    by the generation's evaluation.json, if any."""
    from pipelines.report.page import render_page  # matplotlib and Jinja2 only when writing

    out_dir = location(out_dir) if out_dir is not None else default_report_dir(generation)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / REPORT_JSON).is_file():
        raise ValueError(f"{out_dir} holds files but no {REPORT_JSON}; give an empty or new folder for the report")
    figures = report_figures(read_report_inputs(generation, world_dir))
    with atomic_directory(out_dir, commit=(REPORT_JSON,)) as staging:
        render_page(figures, generation, staging)
        atomic_write_json(staging / REPORT_JSON, figures)
    return out_dir / "index.html"
