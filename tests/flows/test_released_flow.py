"""`capfilt run` with released models (stand-ins: tests/released_models.py): given a captioner, a filter
and a ranker, the flow trains nothing and writes the next generation, its lineage naming the given models.
It runs on Ray (the executor users get by default), as the one whole flow of the suite that does."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from released_models import released_captioner, released_filter

from pipelines.manifests.manifest import Generation
from vlp_core.checkpoint import file_digest
from vlp_core.clip import load_clip, save_clip

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _run(out: Path, home: Path, captioner: Path, filter_model: Path, clip: Path) -> subprocess.CompletedProcess:
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
    ]
    # an ephemeral Prefect of its own; the one whole flow of the suite on Ray (Ray Data actor pools, a local Ray)
    env = {**os.environ, "PREFECT_HOME": str(home), "CAPFILT_EXECUTOR": "ray"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)


def test_given_models_train_nothing_and_make_the_next_generation(tmp_path: Path) -> None:
    captioner, filter_model = released_captioner(tmp_path / "captioner"), released_filter(tmp_path / "filter")
    clip = tmp_path / "clip.safetensors"
    save_clip(load_clip("clip_tiny"), clip)

    result = _run(tmp_path / "run", tmp_path / "prefect", captioner, filter_model, clip)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert not (tmp_path / "run" / "train").exists(), "nothing is trained"
    target = Generation(tmp_path / "run" / "data_manifests", "web", 1)
    info = target.read_info()
    assert info["checkpoints"] == {
        "captioner": file_digest(captioner / "model.safetensors"),
        "filter": file_digest(filter_model / "model.safetensors"),
        "clip": file_digest(clip),
    }
    rows = target.read_samples().to_pylist()
    synthetic = [row for row in rows if row["caption_source"] == "synthetic"]
    assert synthetic and {row["model_ref"] for row in synthetic} == {info["checkpoints"]["captioner"]}
    assert all(row["itm_score"] is not None for row in synthetic)
    assert target.is_done("filter", "00000") and target.is_done("rank", "00000")
    assert (target.path / "report" / "index.html").is_file()
