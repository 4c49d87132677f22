"""`capfilt run` with released models (stand-ins: tests/released_models.py): given a captioner, a filter
and a ranker, the flow trains nothing and writes the next generation, its lineage naming the given models.
It runs in the `capfilt` process (the whole flow on a Ray cluster is tests/pipelines/test_ray_cluster.py's)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from released_captioners import blip2_folder
from released_models import released_captioner, released_filter

from pipelines.manifests.manifest import Generation
from pipelines.world.generate import WorldConfig, make_world
from pipelines.world.server import WorldServer
from vlp_core.checkpoint import file_digest
from vlp_core.clip import load_clip, save_clip

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _run(
    out: Path, home: Path, captioner: Path, filter_model: Path, clip: Path, *extra: str
) -> subprocess.CompletedProcess:
    command = [
        str(BIN / "capfilt"),
        "run",
        "--preset",
        "smoke",
        "--n-web",
        "20",
        "--out",
        str(out),
        "--captioner-checkpoint",
        str(captioner),
        "--filter-checkpoint",
        str(filter_model),
        "--clip-checkpoint",
        str(clip),
        *extra,
    ]
    env = {**os.environ, "PREFECT_HOME": str(home), "CAPFILT_EXECUTOR": "local"}  # an ephemeral Prefect of its own
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)


def test_given_models_on_a_url_list_train_nothing_and_make_the_next_generation(tmp_path: Path) -> None:
    """Real data through `capfilt run` with a released captioner, filter and ranker: a URL list of a world
    served on 127.0.0.1, let through by --allow-network (the URL policy refuses loopback otherwise), with the
    download's shard size. Nothing is trained; generation 1's lineage names the given models."""
    world = make_world(tmp_path / "world", WorldConfig(n_web=20, n_human=5, n_test=0))
    captioner, filter_model = released_captioner(tmp_path / "captioner"), released_filter(tmp_path / "filter")
    clip = tmp_path / "clip.safetensors"
    save_clip(load_clip("clip_tiny"), clip)
    with WorldServer(world.root) as server:
        urls = server.write_url_list(tmp_path / "urls.parquet")
        real_data = ["--url-list", str(urls), "--human-annotations", str(world.human_annotations)]
        real_data += ["--human-image-root", str(world.human_root), "--executor", "local"]
        options = ["--allow-network", "127.0.0.1/32", "--samples-per-shard", "10", "--threads", "4"]
        result = _run(tmp_path / "run", tmp_path / "prefect", captioner, filter_model, clip, *real_data, *options)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "HTTP Request:" not in result.stderr, "Prefect's client requests are not logged to the console"
    assert "Parsing model identifier" not in result.stderr, "nor open_clip's INFO lines on the root logger"
    terminal = (result.stdout + result.stderr).splitlines()
    assert len(terminal) < 60, terminal
    for stage in ("download", "caption", "filter", "rank", "assemble", "report"):
        assert f"▸ {stage}" in result.stderr and f"✓ {stage}" in result.stderr, f"a line as {stage} starts and ends"
    log = (tmp_path / "run" / "capfilt.log").read_text()
    assert "Sharding file number" in log and "Sharding file number" not in result.stderr, (
        "img2dataset writes to the log"
    )
    assert not (tmp_path / "run" / "train").exists(), "nothing is trained"

    web = Generation(tmp_path / "run" / "data_manifests", "web", 0)
    counts = web.read_info()["counts"]
    assert counts["rows"] == 20 and counts["kept"] > 10, counts  # refused as url_policy without --allow-network
    assert "download/url_policy" not in counts["rejected_by_stage_reason"]
    assert web.shards() == ["00000", "00001", "refused"]  # 10 URLs per shard, and the (empty) refused part
    assert json.loads((web.path / "work" / "download_settings.json").read_text())["samples_per_shard"] == 10

    target = Generation(web.root, "web", 1)
    info = target.read_info()
    assert info["checkpoints"] == {
        "captioner": file_digest(captioner / "model.safetensors"),
        "filter": file_digest(filter_model / "model.safetensors"),
        "clip": file_digest(clip),
    }
    distinct = sum(len(set(entry["caption"])) for entry in json.loads(world.human_annotations.read_text()))
    assert info["counts"]["rows_by_source"]["human"] == distinct
    rows = target.read_samples().to_pylist()
    synthetic = [row for row in rows if row["caption_source"] == "synthetic"]
    assert synthetic and {row["model_ref"] for row in synthetic} == {info["checkpoints"]["captioner"]}
    assert all(row["itm_score"] is not None for row in synthetic)
    assert all(target.is_done(stage, shard) for stage in ("filter", "rank") for shard in ("00000", "00001"))
    assert (target.path / "report" / "index.html").is_file()


def test_a_released_blip2_captioner_with_the_clip_scorer_trains_nothing(tmp_path: Path) -> None:
    """Nguyen et al. 2023's recipe: BLIP-2 captions, one CLIP-score cut for web and synthetic captions (here
    keeping each image's best)."""
    reasons = {"clip_below_threshold", "clip_outranked"}
    captioner = blip2_folder(tmp_path / "blip2")
    clip = tmp_path / "clip.safetensors"
    save_clip(load_clip("clip_tiny"), clip)
    command = [
        str(BIN / "capfilt"), "run", "--preset", "smoke", "--n-web", "20", "--out", str(tmp_path / "run"),
        "--captioner-checkpoint", str(captioner), "--captioner-backend", "blip2", "--caption-prompt", "a photo of",
        "--scorer", "clip", "--clip-threshold", "0.0", "--clip-checkpoint", str(clip), "--best-per-image", "1",
    ]  # fmt: skip
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "CAPFILT_EXECUTOR": "local"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert not (tmp_path / "run" / "train").exists(), "nothing is trained"
    target = Generation(tmp_path / "run" / "data_manifests", "web", 1)
    info = target.read_info()
    assert info["checkpoints"] == {"captioner": file_digest(captioner / "model.safetensors"), "clip": file_digest(clip)}
    rows = target.read_samples().to_pylist()
    synthetic = [row for row in rows if row["caption_source"] == "synthetic"]
    assert synthetic and {(row["caption_backend"], row["caption_prompt"]) for row in synthetic} == {
        ("blip2", "a photo of")
    }
    scored = [row for row in rows if row["filter_clip_score"] is not None]
    assert scored and all(row["itm_score"] is None for row in rows)
    assert all(row["kept"] or row["reject_stage"] != "filter" or row["reject_reason"] in reasons for row in scored)
    best = {row["image_id"]: row["filter_clip_score"] for row in scored if row["kept"]}
    assert all(row["filter_clip_score"] >= 0.0 for row in scored if row["kept"])
    assert len(best) == sum(row["kept"] for row in scored), "each image keeps its best caption only"
    outranked = [row for row in scored if row["reject_reason"] == "clip_outranked"]
    assert outranked and all(0.0 <= row["filter_clip_score"] <= best[row["image_id"]] for row in outranked)
    assert json.loads(target.marker_path("filter", "00000").read_text())["scorer"] == "clip"

    page = (target.path / "report" / "index.html").read_text()
    assert '<th class="text">Filter scorer</th><td class="text">clip</td>' in page
    assert '<th class="text">CLIP-score threshold (filter)</th><td class="text">0.0</td>' in page
    synthetic_row = next(row for row in scored if row["caption_source"] == "synthetic")
    root = str(tmp_path / "run" / "data_manifests")
    explain = subprocess.run([str(BIN / "capfilt"), "explain", synthetic_row["sample_id"], "--root", root],
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert explain.returncode == 0, explain.stderr
    line = next(line for line in explain.stdout.splitlines() if synthetic_row["caption"][:30] in line)
    assert (
        line.lstrip().startswith("synthetic (blip2)")
        and f"filter clip {synthetic_row['filter_clip_score']:.3f}" in line
    )
