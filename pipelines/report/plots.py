"""The report's plots, drawn with matplotlib from the figures of `pipelines.report.report` (no pyplot state:
each plot is its own Figure, rendered by the Agg and SVG backends). Every plot is saved as SVG (for the
page) and PNG; the files do not depend on the time they were drawn."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

SOURCE_COLOURS = {"web": "#d95f02", "synthetic": "#1b9e77", "human": "#7570b3"}
THRESHOLD_COLOUR = "#444444"
PLOT_FORMATS = ("svg", "png")
STABLE_OUTPUT = {"svg.hashsalt": "capfilt-report"}  # the same element ids in every SVG file

Figures = dict[str, Any]


def _figure(width: float = 7.0, height: float = 3.6) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def funnel_plot(figures: Figures) -> Figure | None:
    """Rows still kept after each stage, one bar per source."""
    funnel = figures["funnel"]
    if not funnel:
        return None
    figure = _figure()
    ax = figure.subplots()
    steps = [step["step"] for step in next(iter(funnel.values()))]
    width = 0.8 / len(funnel)
    for index, (source, source_steps) in enumerate(funnel.items()):
        positions = [x + (index - (len(funnel) - 1) / 2) * width for x in range(len(steps))]
        ax.bar(
            positions, [step["rows"] for step in source_steps], width, label=source, color=SOURCE_COLOURS.get(source)
        )
    ax.set_xticks(range(len(steps)), steps)
    ax.set_ylabel("rows kept after the step")
    ax.set_title("Funnel: candidates left after each stage")
    ax.legend()
    return figure


def rejections_plot(figures: Figures) -> Figure | None:
    """Rejected rows per stage/reason, stacked by source."""
    rejections = figures["rejections"]
    if not rejections:
        return None
    labels = list(dict.fromkeys(f"{r['stage']}/{r['reason']}" for r in rejections))
    figure = _figure(height=1.2 + 0.35 * len(labels))
    ax = figure.subplots()
    left = [0] * len(labels)
    for source in dict.fromkeys(r["source"] for r in rejections):
        counts = [
            sum(r["rows"] for r in rejections if r["source"] == source and f"{r['stage']}/{r['reason']}" == label)
            for label in labels
        ]
        ax.barh(range(len(labels)), counts, left=left, label=source, color=SOURCE_COLOURS.get(source))
        left = [a + b for a, b in zip(left, counts)]
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("rejected rows")
    ax.set_title("Rejections per stage and reason")
    ax.legend()
    return figure


def score_plot(name: str, setting: str) -> Callable[[Figures], Figure | None]:
    """A plot of the `name` score histograms per source, with the recorded thresholds; the title names
    the stage `setting` (figures["thresholds"][setting])."""

    def plot(figures: Figures) -> Figure | None:
        histograms = figures["scores"][name]
        if not histograms["by_source"]:
            return None
        figure = _figure()
        ax = figure.subplots()
        for source, histogram in histograms["by_source"].items():
            ax.stairs(
                histogram["counts"],
                histograms["edges"],
                label=f"{source} (n={histogram['n']})",
                color=SOURCE_COLOURS.get(source),
                linewidth=1.8,
            )
        if setting.endswith("_threshold"):
            for threshold in figures["thresholds"][setting]:
                ax.axvline(threshold, color=THRESHOLD_COLOUR, linestyle="--", label=f"threshold {threshold:.4g}")
        label = name.replace("_", " ").upper()
        ax.set_xlabel(f"{label} score")
        ax.set_ylabel("captions")
        values = ", ".join(f"{value:.4g}" for value in figures["thresholds"][setting])
        ax.set_title(
            f"{label} scores per caption source" + (f" ({setting.replace('_', ' ')} {values})" if values else "")
        )
        ax.legend()
        return figure

    return plot


def caption_length_plot(figures: Figures) -> Figure | None:
    """Share of captions per length in words, per source."""
    text = figures["text"]
    if not text:
        return None
    figure = _figure()
    ax = figure.subplots()
    for source, stats in text.items():
        histogram, total = stats["all"]["length_histogram"], stats["all"]["captions"]
        if total:
            ax.stairs(
                [count / total for count in histogram],
                [x - 0.5 for x in range(len(histogram) + 1)],
                label=source,
                color=SOURCE_COLOURS.get(source),
                linewidth=1.8,
            )
    ax.set_xlabel("caption length (words)")
    ax.set_ylabel("share of captions")
    ax.set_title("Caption length per source (all candidates)")
    ax.legend()
    return figure


def diversity_plot(figures: Figures) -> Figure | None:
    """Distinct n-grams per source, all candidates and kept captions."""
    text = figures["text"]
    if not text:
        return None
    figure = _figure()
    ax = figure.subplots()
    bars = [(source, subset) for source in text for subset in ("all", "kept")]
    width = 0.8 / len(bars)
    for index, (source, subset) in enumerate(bars):
        distinct = text[source][subset]["distinct_ngrams"]
        positions = [x + (index - (len(bars) - 1) / 2) * width for x in range(len(distinct))]
        ax.bar(
            positions,
            list(distinct.values()),
            width,
            label=f"{source} ({subset})",
            color=SOURCE_COLOURS.get(source),
            hatch="//" if subset == "kept" else None,
            edgecolor="white",
        )
    ax.set_xticks(range(len(distinct)), [f"{n}-grams" for n in distinct])
    ax.set_yscale("symlog")
    ax.set_ylabel("distinct n-grams")
    ax.set_title("Text diversity per source")
    figure.legend(loc="outside right upper", fontsize="small")
    return figure


def history_plot(figures: Figures) -> Figure | None:
    """Retrieval recalls, caption metrics and kept ratio of every generation of the lineage."""
    history = figures["history"]
    figure = _figure(width=9.0)
    metrics_ax, kept_ax = figure.subplots(1, 2)
    generations = [entry["generation"] for entry in history]
    for key in ("tr@1", "tr@5", "ir@1", "ir@5", "bleu_4", "cider"):
        points = [(g, entry[key]) for g, entry in zip(generations, history) if entry[key] is not None]
        if points:
            metrics_ax.plot(*zip(*points), marker="o", label=key)
    metrics_ax.set_xlabel("generation")
    metrics_ax.set_title("Model trained on each generation")
    if metrics_ax.has_data():
        metrics_ax.legend(fontsize="small")
    kept = [(g, entry["kept_ratio"]) for g, entry in zip(generations, history) if entry["kept_ratio"] is not None]
    if kept:
        kept_ax.plot(*zip(*kept), marker="o", color="#666666")
    kept_ax.set_ylim(0, 1.05)
    kept_ax.set_xlabel("generation")
    kept_ax.set_title("Kept ratio")
    for ax in (metrics_ax, kept_ax):
        ax.set_xticks(generations)
    return figure


def world_plot(figures: Figures) -> Figure | None:
    """Removal rate per true noise type, by the filter and by all stages."""
    world = figures["world"]
    if world is None or not world["filter"]["by_noise_type"]:
        return None
    figure = _figure()
    ax = figure.subplots()
    types = list(world["filter"]["by_noise_type"])
    for index, (key, colour) in enumerate((("filter", "#1f78b4"), ("all_stages", "#a6cee3"))):
        rates = [world[key]["by_noise_type"][t]["removal_rate"] for t in types]
        ax.bar(
            [x + (index - 0.5) * 0.4 for x in range(len(types))], rates, 0.4, label=key.replace("_", " "), color=colour
        )
    ax.set_xticks(range(len(types)), types, rotation=20)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("removed share of web pairs")
    ax.set_title("Removal per true noise type (synthetic world)")
    ax.legend(loc="upper center", ncols=2)
    return figure


PLOTS: dict[str, Callable[[Figures], Figure | None]] = {
    "funnel": funnel_plot,
    "rejections": rejections_plot,
    "itm_scores": score_plot("itm", "itm_threshold"),
    "filter_clip_scores": score_plot("filter_clip", "clip_threshold"),
    "clip_scores": score_plot("clip", "clip_top_k"),
    "caption_lengths": caption_length_plot,
    "diversity": diversity_plot,
    "history": history_plot,
    "world": world_plot,
}


def write_plots(figures: Figures, folder: Path) -> dict[str, str]:
    """Draw every plot that has data into `folder`; returns plot name -> SVG file name."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    with matplotlib.rc_context(STABLE_OUTPUT):
        for name, plot in PLOTS.items():
            figure = plot(figures)
            if figure is None:
                continue
            for extension in PLOT_FORMATS:
                metadata = {"Date": None} if extension == "svg" else {"Software": None}
                figure.savefig(folder / f"{name}.{extension}", format=extension, metadata=metadata, dpi=100)
            written[name] = f"{name}.svg"
    return written
