"""The dataset-quality report on generations built by the real stages (download, caption, filter, rank,
assemble, evaluate with tiny random models on the stage world): its figures against DuckDB queries of
the manifests, its determinism, and its page in headless Chromium."""

import json
import os
import statistics
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from browser import Chromium, find_chromium

from pipelines.cli.main import main
from pipelines.manifests.manifest import Generation, ManifestError, generation_info, read_part, samples_table
from pipelines.report.examples import N_EXAMPLES, N_EXTREMES
from pipelines.report.report import REPORT_JSON, read_report_inputs, report_figures, verdict, write_report
from pipelines.report.tallies import text_stats
from pipelines.stages.assemble import AssembleConfig, run_assemble
from pipelines.stages.caption import CaptionConfig, run_caption
from pipelines.stages.evaluate import EvaluateConfig, run_evaluate
from pipelines.stages.filter import FilterConfig, rethreshold, run_filter
from pipelines.stages.rank import RankConfig, run_rank
from pipelines.world.generate import WorldPaths
from pipelines.world.grammar import NOISY_TYPES

TOP_K = 2
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts" / "report"


@pytest.fixture(scope="module")
def lineage(
    ray_local,
    tmp_path_factory,
    downloaded_gen0,
    stage_world: WorldPaths,
    tiny_blip_checkpoint,
    tiny_clip_checkpoint,
    dataset_copier,
) -> tuple[Generation, float]:
    """Generation 1 of a private copy of the stage world's download, built by every stage (filter threshold:
    the median ITM score), and both generations evaluated on the world; returns (gen 1, threshold)."""
    web = dataset_copier(downloaded_gen0, tmp_path_factory.mktemp("report"))
    target = Generation(web.root, web.dataset, 1)
    run_caption(CaptionConfig(tiny_blip_checkpoint, num_captions=4, min_length=2, max_length=8), web, target)
    run_filter(FilterConfig(tiny_blip_checkpoint, threshold=0.0, batch_size=8), target)
    scores = target.read_samples()["itm_score"]
    threshold = statistics.median(s for s in scores.to_pylist() if s is not None)
    rethreshold(target, threshold)
    run_rank(RankConfig("clip_tiny", tiny_clip_checkpoint, top_k=TOP_K, batch_size=8), target)
    run_assemble(
        AssembleConfig(stage_world.human_annotations, stage_world.human_root),
        target,
        parent=0,
        checkpoints={"captioner": "sha256:c1", "filter": "sha256:f1"},
        stages=["caption", "filter", "rank"],
        config_digest="sha256:cafe",
        flow_run_id="flow-run-1",
    )
    for generation in (web, target):
        run_evaluate(
            EvaluateConfig(
                tiny_blip_checkpoint,
                stage_world.test_annotations,
                stage_world.test_root,
                k_test=4,
                caption_method="greedy",
                max_length=8,
                world_dir=stage_world.root,
            ),
            generation,
        )
    return target, threshold


@pytest.fixture(scope="module")
def figures(lineage) -> dict:
    return report_figures(read_report_inputs(lineage[0]))


def query(generation: Generation, sql: str) -> list[tuple]:
    """Run `sql` on the generation's rows (table `samples`) with DuckDB."""
    connection = duckdb.connect()
    connection.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet('{generation.samples_dir}/part-*.parquet')")
    return connection.execute(sql).fetchall()


@pytest.mark.slow
def test_counts_funnel_and_rejections_equal_duckdb(lineage, figures) -> None:
    generation, _ = lineage
    by_source = query(
        generation,
        "SELECT caption_source, count(*), count(*) FILTER (kept), count(DISTINCT image_id) FROM samples GROUP BY ALL",
    )
    counts = figures["counts"]
    assert {
        s: (counts["rows_by_source"][s], counts["kept_by_source"].get(s, 0), counts["images_by_source"][s])
        for s in counts["rows_by_source"]
    } == {s: (n, k, i) for s, n, k, i in by_source}
    assert {"web", "synthetic", "human"} == set(counts["rows_by_source"])

    rejected = query(
        generation,
        "SELECT reject_stage, reject_reason, caption_source, count(*) FROM samples WHERE NOT kept GROUP BY ALL",
    )
    assert sorted((r["stage"], r["reason"], r["source"], r["rows"]) for r in figures["rejections"]) == sorted(rejected)
    stages = {r["stage"] for r in figures["rejections"]}
    assert {"download", "filter", "rank"} <= stages, "the stage world has download errors, filter and rank rejects"

    for source, steps in figures["funnel"].items():
        assert [step["step"] for step in steps] == ["candidates", "download", "caption", "filter", "rank", "assemble"]
        for step in steps[1:]:
            [(left,)] = query(
                generation,
                f"SELECT count(*) FROM samples WHERE caption_source = '{source}' AND "
                f"(kept OR reject_stage NOT IN {_stages_up_to(step['step'])})",
            )
            assert step["rows"] == left, (source, step)
        assert steps[-1]["rows"] == counts["kept_by_source"].get(source, 0)


def _stages_up_to(stage: str) -> tuple[str, ...]:
    order = ("download", "caption", "filter", "rank", "assemble")
    return order[: order.index(stage) + 1] + ("",)  # ("x",) would not be valid SQL


@pytest.mark.slow
def test_score_histograms_and_thresholds_equal_duckdb(lineage, figures) -> None:
    generation, threshold = lineage
    assert figures["thresholds"] == {
        "filter_scorer": ["itm"],
        "itm_threshold": [threshold],
        "clip_threshold": [],
        "best_per_image": [0],
        "clip_top_k": [TOP_K],
    }
    for name, column in (("itm", "itm_score"), ("clip", "clip_score")):
        histograms = figures["scores"][name]
        edges = np.array(histograms["edges"])
        if name == "itm":
            assert (edges[0], edges[-1]) == (0.0, 1.0)
        summaries = query(
            generation,
            f"SELECT caption_source, count({column}), avg({column}), min({column}), "
            f"max({column}) FROM samples WHERE {column} IS NOT NULL GROUP BY ALL",
        )
        assert set(histograms["by_source"]) == {s for s, *_ in summaries} == {"web", "synthetic"}
        for source, n, mean, low, high in summaries:
            histogram = histograms["by_source"][source]
            assert histogram["n"] == n and sum(histogram["counts"]) == n
            assert histogram["mean"] == pytest.approx(mean, rel=1e-9)
            assert (histogram["min"], histogram["max"]) == pytest.approx((low, high))
            width = edges[1] - edges[0]
            buckets = query(
                generation,
                f"SELECT least(floor(({column} - {edges[0]}) / {width}), "
                f"{len(edges) - 2})::INT AS b, count(*) FROM samples WHERE caption_source = "
                f"'{source}' AND {column} IS NOT NULL GROUP BY b",
            )
            expected = [0] * (len(edges) - 1)
            for bucket, count in buckets:
                expected[bucket] = count
            assert histogram["counts"] == expected, (name, source)


TOKENS = "string_split_regex(trim(regexp_replace(lower(coalesce(caption, '')), '[^a-z0-9_\\s]', ' ', 'g')), '\\s+')"


@pytest.mark.slow
def test_text_statistics_equal_duckdb(lineage, figures) -> None:
    generation, _ = lineage
    words = (
        f"SELECT caption_source AS source, kept, row_number() OVER () AS caption_id, "
        f"list_filter({TOKENS}, lambda w: w <> '') AS words FROM samples"
    )
    for subset, condition in (("all", "true"), ("kept", "kept")):
        rows = query(
            generation,
            f"""
            WITH captions AS ({words}), picked AS (SELECT * FROM captions WHERE {condition})
            SELECT source, count(*), avg(len(words)), count(DISTINCT words),
                   (SELECT count(DISTINCT w) FROM (SELECT unnest(p2.words) AS w FROM picked p2
                                                   WHERE p2.source = picked.source)),
                   (SELECT count(DISTINCT [words[i], words[i + 1]]) FROM
                      (SELECT words, unnest(range(1, len(words))) AS i FROM picked p3 WHERE p3.source = picked.source))
            FROM picked GROUP BY source""",
        )
        for source, n, mean_length, distinct_captions, vocabulary, bigrams in rows:
            stats = figures["text"][source][subset]
            assert stats["captions"] == n and stats["vocabulary"] == vocabulary, (source, subset)
            assert stats["mean_length"] == pytest.approx(mean_length)
            assert stats["duplicate_rate"] == pytest.approx(1 - distinct_captions / n)
            assert stats["distinct_ngrams"]["2"] == bigrams
            assert sum(stats["length_histogram"]) == n
        assert {source for source, *_ in rows} == {s for s, v in figures["text"].items() if v[subset]["captions"]}


def test_text_statistics_by_hand() -> None:
    stats = text_stats(["A red circle.", "a red circle", "", None, "a blue circle"])
    assert stats["captions"] == 5 and stats["empty"] == 2
    assert stats["length_histogram"] == [2, 0, 0, 3]
    assert stats["vocabulary"] == 4  # a, red, circle, blue
    assert stats["distinct_ngrams"] == {"1": 4, "2": 4, "3": 2, "4": 0}  # a red, red circle, a blue, blue circle
    assert stats["distinct_ngram_ratio"]["1"] == pytest.approx(4 / 9)
    assert stats["duplicate_rate"] == pytest.approx(1 - 3 / 5)  # "a red circle" twice, the empty one twice


@pytest.mark.slow
def test_examples_history_and_world_truth(lineage, figures, stage_world) -> None:
    generation, _ = lineage
    best = query(
        generation,
        "SELECT image_id, max(itm_score) AS best FROM samples WHERE caption_source IN "
        "('web', 'synthetic') AND itm_score IS NOT NULL GROUP BY image_id "
        "ORDER BY best DESC, image_id",
    )
    examples = figures["examples"]
    assert len(examples) == N_EXAMPLES and len({e["image_id"] for e in examples}) == N_EXAMPLES
    assert [e["image_id"] for e in examples[: 2 * N_EXTREMES]] == [i for i, _ in best[:N_EXTREMES] + best[-N_EXTREMES:]]
    for example in examples:
        [(n_captions,)] = query(generation, f"SELECT count(*) FROM samples WHERE image_id = '{example['image_id']}'")
        assert len(example["captions"]) == n_captions and example["captions"][0]["caption_source"] == "web"

    assert [entry["generation"] for entry in figures["history"]] == [0, 1]
    for entry in figures["history"]:
        folder = Generation(generation.root, generation.dataset, entry["generation"])
        evaluation = json.loads((folder.path / "evaluation.json").read_text())
        assert entry["tr@1"] == evaluation["retrieval"]["tr@1"] and entry["cider"] == evaluation["captioning"]["cider"]
        [(kept_ratio,)] = query(folder, "SELECT avg(kept::INT) FROM samples")
        assert entry["kept_ratio"] == pytest.approx(kept_ratio)

    truth = f"read_parquet('{stage_world.web_noise}')"
    decided = (
        f"SELECT t.noise_type AS noise, CASE WHEN kept THEN 'kept' ELSE reject_stage END AS decision "
        f"FROM samples s JOIN {truth} t ON regexp_extract(s.url, '([^/]+)\\.[a-z]+$', 1) = t.key "
        "WHERE caption_source = 'web'"
    )
    table = query(generation, f"SELECT noise, decision, count(*) FROM ({decided}) GROUP BY ALL")
    world = figures["world"]
    assert {(t, d, n) for t, row in world["decisions"].items() for d, n in row.items()} == set(table)
    noisy = ", ".join(f"'{t}'" for t in NOISY_TYPES)
    [(removed, noisy_removed, noisy_total)] = query(
        generation,
        f"""
        SELECT count(*) FILTER (decision = 'filter'), count(*) FILTER (decision = 'filter' AND noise IN ({noisy})),
               count(*) FILTER (noise IN ({noisy})) FROM ({decided}) WHERE decision NOT IN ('download', 'caption')""",
    )
    assert world["filter"]["removed"] == removed > 0
    assert world["filter"]["precision"] == pytest.approx(noisy_removed / removed)
    assert world["filter"]["recall"] == pytest.approx(noisy_removed / noisy_total)
    assert world["world_dir"] == str(stage_world.root)


@pytest.mark.slow
def test_figures_do_not_depend_on_how_the_rows_are_split_into_parts(lineage, figures, dataset_copier, tmp_path) -> None:
    """The report streams part by part: the same rows in twice as many parts (each image's rows kept
    together, as the stages write them) give the same figures."""
    regrouped = dataset_copier(lineage[0], tmp_path)
    for shard in regrouped.shards():
        table = read_part(regrouped.part_path(shard))
        images = sorted(set(table["image_id"].to_pylist()))
        first_half = pc.is_in(table["image_id"], pa.array(images[: len(images) // 2], pa.string()))
        marked = regrouped.path.glob(f"markers/*/{shard}.json")
        markers = {path.parent.name: json.loads(path.read_text()) for path in marked}
        for stage in markers:
            regrouped.marker_path(stage, shard).unlink()
        regrouped.part_path(shard).unlink()
        for half, rows in (("a", table.filter(first_half)), ("b", table.filter(pc.invert(first_half)))):
            for stage, stats in markers.items():
                regrouped.write_part(stage, f"{shard}{half}", rows, stats)
    assert len(regrouped.shards()) == 2 * len(lineage[0].shards())
    again = report_figures(read_report_inputs(regrouped))
    assert again["lineage"].pop("manifest_digest") != figures["lineage"]["manifest_digest"]
    assert again == {**figures, "lineage": {k: v for k, v in figures["lineage"].items() if k != "manifest_digest"}}


@pytest.mark.slow
def test_report_files_are_a_function_of_the_inputs(lineage, tmp_path) -> None:
    generation, _ = lineage
    first, second = write_report(generation, tmp_path / "a"), write_report(generation, tmp_path / "b")
    for name in (REPORT_JSON, "index.html", "plots/itm_scores.svg", "plots/history.svg"):
        assert (first.parent / name).read_bytes() == (second.parent / name).read_bytes(), name
    assert json.loads((first.parent / REPORT_JSON).read_text()) == json.loads(
        json.dumps(report_figures(read_report_inputs(generation)))
    )


@pytest.mark.slow
def test_explain_follows_a_dropped_and_a_kept_sample_through_the_generations(lineage, capsys) -> None:
    generation, _ = lineage
    [(dropped_url, dropped_caption, dropped_image)] = query(
        generation,
        "SELECT url, caption, image_id FROM samples WHERE caption_source = 'web' AND reject_stage = 'filter' "
        "ORDER BY sample_id LIMIT 1",
    )
    [(synthetic,)] = query(
        generation, f"SELECT count(*) FROM samples WHERE caption_source = 'synthetic' AND image_id = '{dropped_image}'"
    )
    [(kept_id, kept_image, kept_caption)] = query(
        generation,
        "SELECT sample_id, image_id, caption FROM samples WHERE caption_source = 'synthetic' AND kept "
        "ORDER BY sample_id LIMIT 1",
    )
    where = ["--root", str(generation.root), "--dataset", generation.dataset]

    assert main(["explain", dropped_url, *where]) == 0
    out = capsys.readouterr().out.splitlines()
    name = generation.dataset
    assert out[0] == f"{name} gen 0: download"
    gen1 = out[next(i for i, line in enumerate(out) if line.startswith(f"{name} gen 1 (from gen 0): caption")) :]
    dropped = [line for line in gen1 if line.startswith(f"  {'web':<18} dropped by filter: itm_below_threshold")]
    assert len(dropped) == 1 and dropped_caption[:40] in dropped[0]
    assert sum(line.startswith("  synthetic") for line in gen1) == synthetic > 0

    assert main(["explain", kept_id, *where]) == 0  # a synthetic row's sample id names its image
    out = capsys.readouterr().out
    assert f"image {kept_image}" in out and any(
        line.startswith(f"  {'synthetic (blip)':<18} kept") and kept_caption[:40] in line for line in out.splitlines()
    )
    assert main(["explain", "http://nowhere.example/a.jpg", *where]) == 2
    assert "no row of" in capsys.readouterr().err


@pytest.mark.slow
def test_the_verdict_compares_with_the_parent_and_says_what_each_stage_removed(lineage, figures, tmp_path) -> None:
    generation, _ = lineage
    verdict = figures["verdict"]
    parent, this = figures["history"]
    assert verdict["changes"] and all(
        change == {"parent": parent[key], "this": this[key], "change": this[key] - parent[key]}
        for key, change in verdict["changes"].items()
    )
    assert verdict["better"] == [key for key, change in verdict["changes"].items() if change["change"] >= 5e-4]
    assert verdict["worse"] == [key for key, change in verdict["changes"].items() if change["change"] <= -5e-4]
    removed = {(entry["stage"], entry["source"]): entry["rows"] for entry in verdict["removed"]}
    [(filtered,)] = query(
        generation, "SELECT count(*) FROM samples WHERE reject_stage = 'filter' AND caption_source = 'synthetic'"
    )
    assert removed[("filter", "synthetic")] == filtered > 0
    page = write_report(generation, tmp_path / "report").read_text()
    assert f"Verdict: {verdict['summary']}." in page


def test_a_change_the_page_shows_as_zero_is_no_change() -> None:
    def history(*values: float) -> list[dict]:
        keys = ("tr@1", "tr@5", "ir@1", "ir@5", "bleu_4", "cider")
        return [{"generation": number, **dict(zip(keys, row))} for number, row in enumerate(values)]

    same = verdict(history((0.5,) * 6, (0.5001, 0.5, 0.4999, 0.5, 0.5, 0.5)), {})
    assert same["summary"] == "no change against generation 0 on the held-out metrics"
    assert same["better"] == same["worse"] == []
    mixed = verdict(history((0.5,) * 6, (0.6, 0.5, 0.4, 0.5, 0.5, 0.5)), {})
    assert (mixed["better"], mixed["worse"]) == (["tr@1"], ["ir@1"])
    assert mixed["summary"] == "mixed against generation 0: better on tr@1, worse on ir@1"
    worse = verdict(history((0.5,) * 6, (0.4,) * 6), {})
    assert worse["summary"].startswith("worse than generation 0 on every held-out metric")
    one = verdict(history((0.5,) * 6, (0.5, 0.5, 0.5, 0.5, 0.5, 0.6)), {})
    assert one["summary"] == "better than generation 0 on cider; the others did not change"


@pytest.mark.slow
def test_generations_reasons_prints_the_funnel_of_the_report(lineage, figures, capsys) -> None:
    generation, _ = lineage
    assert main(["generations", "--root", str(generation.root), "--reasons"]) == 0
    out = capsys.readouterr().out
    block = out.split(f"{generation.dataset} gen 1: rows left after each stage\n")[1].split("\n\n")[0].splitlines()
    assert block[0].split() == ["source", *(step["step"] for step in figures["funnel"]["web"])]
    assert {line.split()[0] for line in block[1:]} == set(figures["funnel"]) == {"web", "synthetic", "human"}
    for line in block[1:]:
        source, *numbers = line.split()
        assert [int(n) for n in numbers] == [step["rows"] for step in figures["funnel"][source]]


@pytest.mark.slow
def test_cli_writes_into_the_generation_and_replaces_an_old_report(lineage, capsys) -> None:
    generation, _ = lineage
    stale = generation.path / "report" / "plots" / "stale.svg"
    stale.parent.mkdir(parents=True, exist_ok=True)
    (generation.path / "report" / REPORT_JSON).write_text("{}")
    stale.write_text("<svg/>")
    argv = ["report", "--root", str(generation.root), "--dataset", generation.dataset, "--generation", "1"]
    assert main(argv) == 0
    page = generation.path / "report" / "index.html"
    assert f"report: {page}" in capsys.readouterr().out
    assert not stale.exists(), "the old report folder is replaced as a whole"
    report = json.loads((page.parent / REPORT_JSON).read_text())
    assert report["lineage"]["flow_run_id"] == "flow-run-1" and report["lineage"]["config_digest"] == "sha256:cafe"
    assert {p.name for p in (page.parent / "plots").iterdir()} >= {"funnel.svg", "funnel.png", "world.svg"}
    assert [p.name for p in page.parent.parent.iterdir() if p.name.startswith(".report")] == [], "no staging left"


@pytest.mark.slow
def test_page_renders_in_chromium_with_every_image(lineage, tmp_path) -> None:
    chromium = find_chromium()
    if chromium is None:
        message = "headless Chromium not found: install Debian's `chromium` (apt-get install chromium) or set CHROMIUM"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run this test (.ci/run installs it)")
        pytest.skip(message)
    page = write_report(lineage[0], tmp_path / "report")
    screenshot = ARTIFACTS / "generation-1.png"
    with Chromium(chromium) as browser:
        visit = browser.visit(page, screenshot)
    print(f"report screenshot: {screenshot}")
    assert visit.console_errors == []
    assert visit.broken_images == []
    n_plots = len(list((page.parent / "plots").glob("*.svg")))
    assert len(visit.images) == n_plots + N_EXAMPLES and n_plots == 8
    assert visit.title == "capfilt report: world generation 1"
    assert screenshot.stat().st_size > 10_000


def test_a_broken_image_is_shown_as_missing_and_an_unknown_folder_is_refused(tmp_path) -> None:
    generation = Generation(tmp_path / "manifests", "web", 0)
    generation.write_part(
        "download",
        "00000",
        samples_table(
            {
                "image_id": ["web-0", "web-1"],
                "image_ref": ["gen-0000/shards/00000.tar#0", None],
                "url": ["http://example.org/a.jpg", "http://example.org/b.jpg"],
                "caption": ["a red star", "a dog"],
                "caption_source": ["web", "web"],
                "generation": [0, 0],
                "kept": [True, False],
                "reject_stage": [None, "download"],
                "reject_reason": [None, "http_404"],
            }
        ),
        {},
    )
    generation.write_info(
        generation_info(
            generation.counts(), dataset="web", number=0, parent=None, stages=["download"], config_digest="x"
        )
    )
    page = write_report(generation)
    html = page.read_text()
    assert "image unavailable" in html and "00000.tar" in html
    report = json.loads((page.parent / REPORT_JSON).read_text())
    assert report["world"] is None and report["scores"]["itm"] == {"edges": [], "by_source": {}}
    assert report["rejections"] == [{"stage": "download", "reason": "http_404", "source": "web", "rows": 1}]

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files but no report.json"):
        write_report(generation, tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="no ground truth"):
        write_report(generation, world_dir=tmp_path)
    with pytest.raises(ManifestError, match="generation.json: missing"):
        write_report(Generation(tmp_path / "manifests", "web", 1))
