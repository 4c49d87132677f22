from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.manifests.manifest import (
    COLUMNS_ADDED,
    SAMPLE_SCHEMA,
    SCHEMA_VERSION_KEY,
    Generation,
    ManifestError,
    config_digest,
    generation_counts,
    generation_info,
    list_generations,
    read_part,
    sample_id,
    samples_table,
)


def _rows(n: int = 4) -> pa.Table:
    return samples_table(
        {
            "image_id": [f"img-{i // 2}" for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
            "caption_source": ["web", "synthetic"] * (n // 2),
            "generation": [1] * n,
            "parent_generation": [0] * n,
            "itm_score": [0.1 * i for i in range(n)],
            "kept": [i % 3 != 0 for i in range(n)],
            "reject_stage": ["filter" if i % 3 == 0 else None for i in range(n)],
            "reject_reason": ["itm_below_threshold" if i % 3 == 0 else None for i in range(n)],
        }
    )


def test_round_trip_and_plain_readers(tmp_path: Path) -> None:
    generation = Generation(tmp_path, "web", 1)
    table = _rows()
    generation.write_part("download", "00000", table, {})
    assert generation.read_samples().equals(table)
    part = generation.part_path("00000")
    # Plain pyarrow, DuckDB and Polars read the same rows.
    assert pq.read_table(part).num_rows == 4
    assert duckdb.sql(f"select count(*) from '{part}' where kept").fetchall() == [(2,)]
    assert pl.read_parquet(part)["caption_source"].to_list() == ["web", "synthetic", "web", "synthetic"]
    assert not list(generation.samples_dir.glob(".*tmp")), "no temporary files left behind"


def test_sample_id_is_stable_and_distinguishes_sources() -> None:
    assert sample_id("a", "web", "x") == sample_id("a", "web", "x")
    assert sample_id("a", "web", "x") != sample_id("a", "synthetic", "x")
    assert len(sample_id("a", "web", None)) == 16


def test_counts_and_lineage(tmp_path: Path) -> None:
    table = _rows(6)
    counts = generation_counts([table])
    assert counts["rows"] == 6 and counts["kept"] == 4
    assert counts["rows_by_source"] == {"synthetic": 3, "web": 3}
    assert counts["images_by_source"] == {"synthetic": 3, "web": 3}
    assert counts["rejected_by_stage_reason"] == {"filter/itm_below_threshold": 2}

    generation = Generation(tmp_path, "web", 1)
    generation.write_part("download", "00000", table, {})
    generation.write_info(
        generation_info(
            generation_counts([table]),
            dataset="web",
            number=1,
            parent=0,
            stages=["filter"],
            config_digest=config_digest({"k": 2}),
        )
    )
    info = generation.read_info()
    assert info["parent_generation"] == 0 and info["counts"] == counts
    assert list_generations(tmp_path) == [generation]


def test_markers(tmp_path: Path) -> None:
    generation = Generation(tmp_path, "web", 0)
    assert not generation.is_done("caption", "00001")
    generation.mark_done("caption", "00001", {"rows": 3})
    assert generation.is_done("caption", "00001") and not generation.is_done("filter", "00001")


def _write_raw(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _bad_tables() -> dict[str, tuple[pa.Table, str]]:
    good = _rows()
    wrong_type = good.set_column(good.schema.get_field_index("kept"), "kept", pa.array(["yes"] * 4))
    foreign = good.replace_schema_metadata({SCHEMA_VERSION_KEY: b"99"})
    null_required = good.set_column(
        good.schema.get_field_index("image_id"), pa.field("image_id", pa.string()), pa.array([None] * 4, pa.string())
    )
    bad_source = good.set_column(
        good.schema.get_field_index("caption_source"), "caption_source", pa.array(["tweet"] * 4)
    )
    renamed = good.rename_columns(["source" if n == "caption_source" else n for n in good.column_names])
    return {
        "missing column": (good.drop_columns(["kept"]), "missing column 'kept'"),
        "renamed column": (renamed.replace_schema_metadata(good.schema.metadata), "missing column 'caption_source'"),
        "wrong type": (wrong_type.replace_schema_metadata(good.schema.metadata), "column 'kept' has type string"),
        "foreign version": (foreign, "schema version 99"),
        "no metadata": (good.replace_schema_metadata(None), "not a capfilt manifest"),
        "null in required": (null_required.replace_schema_metadata(good.schema.metadata), "'image_id' has null"),
        "unknown source": (bad_source.replace_schema_metadata(good.schema.metadata), "'tweet'"),
    }


@pytest.mark.parametrize("case", list(_bad_tables()))
def test_schema_errors_name_file_and_column(tmp_path: Path, case: str) -> None:
    table, message = _bad_tables()[case]
    generation = Generation(tmp_path, "web", 0)
    part = _write_raw(generation.part_path("00000"), table)
    generation.mark_done("download", "00000", {})  # written by another tool, marked as its data
    with pytest.raises(ManifestError, match=message) as error:
        generation.read_samples()
    assert str(part) in str(error.value)


def test_truncated_parquet_is_a_clear_error(tmp_path: Path) -> None:
    generation = Generation(tmp_path, "web", 0)
    generation.write_part("download", "00000", _rows(), {})
    part = generation.part_path("00000")
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(ManifestError, match="unreadable Parquet file"):
        generation.read_samples()


def test_invalid_rows_are_not_written(tmp_path: Path) -> None:
    generation = Generation(tmp_path, "web", 0)
    with pytest.raises(ManifestError, match="unknown manifest column"):
        generation.write_part("download", "00000", samples_table({"image_id": ["a"], "colour": ["red"]}), {})
    with pytest.raises(ManifestError, match="no part"):
        generation.read_samples()


def test_missing_generation_info_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="generation.json: missing"):
        Generation(tmp_path, "web", 3).read_info()


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(max_size=30),
            st.sampled_from(["web", "synthetic", "human"]),
            st.one_of(st.none(), st.text(max_size=60)),
            st.booleans(),
            st.one_of(st.none(), st.floats(0, 1, width=32)),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_round_trip_property(rows) -> None:
    import tempfile

    table = samples_table(
        {
            "image_id": [r[0] for r in rows],
            "caption_source": [r[1] for r in rows],
            "caption": [r[2] for r in rows],
            "generation": [0] * len(rows),
            "kept": [r[3] for r in rows],
            "clip_score": [r[4] for r in rows],
        }
    )
    assert table.schema.equals(SAMPLE_SCHEMA, check_metadata=True)
    with tempfile.TemporaryDirectory() as tmp:
        generation = Generation(Path(tmp), "web", 0)
        generation.write_part("download", "00000", table, {})
        assert generation.read_samples().to_pylist() == table.to_pylist()


def test_a_version_1_part_reads_with_the_columns_added_since_as_null(tmp_path):
    current = _rows()
    added = [name for names in COLUMNS_ADDED.values() for name in names]
    version_1 = current.drop_columns(added).replace_schema_metadata({SCHEMA_VERSION_KEY: b"1"})
    path = _write_raw(tmp_path / "part-00000.parquet", version_1)

    table = read_part(path)
    assert table.schema == SAMPLE_SCHEMA
    assert table.drop_columns(added).equals(current.drop_columns(added))
    assert all(table[name].null_count == len(table) for name in added)
    subset = read_part(path, ["caption_backend", "sample_id"])
    assert subset.column_names == ["caption_backend", "sample_id"]
    assert subset["sample_id"].to_pylist() == current["sample_id"].to_pylist()
    assert subset["caption_backend"].null_count == len(subset)

    with pytest.raises(ManifestError, match="missing column 'kept'"):
        read_part(_write_raw(tmp_path / "part-00001.parquet", version_1.drop_columns(["kept"])))
    with pytest.raises(ManifestError, match="missing column 'caption_prompt'"):  # version 2 must have them
        read_part(_write_raw(tmp_path / "part-00002.parquet", current.drop_columns(["caption_prompt"])))
