"""Property-based round trips over every manifest column, and over CSV URL lists with any caption text."""

import tempfile
from pathlib import Path

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.manifests.manifest import CAPTION_SOURCES, SAMPLE_SCHEMA, Generation, samples_table
from pipelines.stages.download import read_url_list

_INT32 = st.integers(-(2**31), 2**31 - 1)
_FLOAT32 = st.floats(width=32, allow_nan=False)


def _values(field: pa.Field) -> st.SearchStrategy:
    if field.name == "caption_source":
        return st.sampled_from(CAPTION_SOURCES)
    base = {pa.string(): st.text(max_size=40), pa.int32(): _INT32, pa.float32(): _FLOAT32, pa.bool_(): st.booleans()}[
        field.type
    ]
    return st.one_of(st.none(), base) if field.nullable else base


_ROW = st.fixed_dictionaries({field.name: _values(field) for field in SAMPLE_SCHEMA})


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(_ROW, min_size=1, max_size=12), shards=st.integers(1, 3))
def test_every_column_survives_a_write_and_read_in_any_number_of_parts(rows, shards) -> None:
    table = samples_table({name: [row[name] for row in rows] for name in SAMPLE_SCHEMA.names})
    with tempfile.TemporaryDirectory() as tmp:
        generation = Generation(Path(tmp), "web", 0)
        for shard in range(shards):
            generation.write_part(
                "download",
                f"{shard:05d}",
                table.slice(
                    shard * len(rows) // shards, (shard + 1) * len(rows) // shards - shard * len(rows) // shards
                ),
                {},
            )
        read = generation.read_samples()
    assert read.schema.equals(SAMPLE_SCHEMA, check_metadata=True)
    assert read.to_pylist() == table.to_pylist()


_CAPTION = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)  # any text UTF-8 can carry


@settings(max_examples=60, deadline=None)
@given(captions=st.lists(_CAPTION, min_size=1, max_size=8))
def test_a_csv_url_list_gives_back_every_caption_as_written(captions) -> None:
    """Quotes, commas, line breaks, control characters and number-like text in a quoted field are kept."""
    lines = ["url,caption"] + [
        f'http://example.org/{i}.jpg,"{c.replace(chr(34), chr(34) * 2)}"' for i, c in enumerate(captions)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "urls.csv"
        path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
        table = read_url_list(path)
    assert table["caption"].to_pylist() == captions  # no type guessing: "00", "NaN" and "" stay as they are
    assert table["row_index"].to_pylist() == list(range(len(captions)))
