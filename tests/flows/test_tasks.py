"""The stage tasks' lines for the terminal, and which failures Prefect retries."""

import logging
from pathlib import Path

import pytest
from prefect.states import Failed

from flows.tasks import describe_result, format_duration, retry_unless_input_error, stage_task
from pipelines.manifests.manifest import Generation
from pipelines.progress import TERMINAL
from pipelines.training.stages import TrainResult


def _counts(rows: int, kept: int) -> dict:
    return {"rows": rows, "kept": kept, "rows_by_source": {}, "kept_by_source": {}, "rejected_by_stage_reason": {}}


def _stage(generation: Generation, fail: bool) -> dict:
    if fail:
        raise ValueError(f"{generation.path}: bad input")
    return _counts(11_700, 2_881)


def test_a_stage_announces_what_it_reads_and_makes_or_why_it_failed(tmp_path: Path, caplog) -> None:
    task = stage_task(_stage, name="filter")
    generation = Generation(tmp_path, "web", 1)
    with caplog.at_level(logging.INFO):
        assert task.fn(generation, fail=False)["kept"] == 2_881
        with pytest.raises(ValueError, match="bad input"):
            task.fn(generation, fail=True)
    lines = [record.getMessage() for record in caplog.records if getattr(record, TERMINAL, False)]
    assert lines == [
        "▸ filter  web gen 1",
        "✓ filter  11,700 rows, 2,881 kept  (0 s)",
        "▸ filter  web gen 1",
        f"✗ filter  {generation.path}: bad input  (0 s)",
    ]


def test_results_read_as_words() -> None:
    trained = TrainResult(Path("/runs/train/pretrain-1/final"), "sha256:1", 400, [{"loss": 6.61123}])
    assert describe_result(trained) == "400 steps, loss 6.611 → /runs/train/pretrain-1/final"
    evaluation = {"retrieval": {"tr@1": 0.31, "ir@1": 0.212}, "captioning": None}
    assert describe_result(evaluation) == "tr@1 0.310, ir@1 0.212"
    assert [format_duration(s) for s in (0.4, 59.6, 117, 3725)] == ["0 s", "1 min 00 s", "1 min 57 s", "1 h 02 min"]


def test_downloads_are_retried_after_network_failures_not_after_bad_input() -> None:
    assert retry_unless_input_error(None, None, Failed(data=ConnectionResetError("reset by peer")))
    assert not retry_unless_input_error(None, None, Failed(data=FileNotFoundError("urls.parquet: URL list not found")))
    assert not retry_unless_input_error(None, None, Failed(data=ValueError("download config: threads must be ≥ 1")))
