"""Training data: the pair file and the batch order hold no per-pair state in memory; an item's randomness
is its own."""

import tracemalloc

import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipelines.training.data import EpochOrder, PairDataset, PairFile, Permutation, image_key, write_pairs
from vlp_core.data import ImageTransform


@pytest.mark.parametrize("n", [*range(1, 40), 255, 256, 257, 1000, 4097])
def test_permutation_is_a_bijection_of_its_range(n):
    order = [Permutation(n, seed=3)[position] for position in range(n)]
    assert sorted(order) == list(range(n))
    with pytest.raises(IndexError):
        Permutation(n, seed=3)[n]


def test_permutations_differ_by_seed_and_shuffle():
    n = 1000
    first, second = ([Permutation(n, seed)[p] for p in range(n)] for seed in (0, 1))
    assert first != second
    assert sum(index == position for position, index in enumerate(first)) < 10  # about 1 expected
    assert [Permutation(n, 0)[p] for p in range(n)] == first  # a pure function of (n, seed, position)


def _write(n: int, path) -> PairFile:
    triples = ((f"web-{i:08d}", f"00000.tar#{i:06d}", f"  a red circle number {i} ") for i in range(n))
    return write_pairs(triples, path, "synthetic pairs")


def test_pair_file_reads_back_cleaned_pairs_and_drops_empty_captions(tmp_path):
    triples = [("a", "x.png", "  A red  circle "), ("a", "x.png", "   "), ("b", "y.png", None), ("b", "y.png", "two")]
    pairs = list(write_pairs(triples, tmp_path / "pairs.arrow", "four"))
    assert [(p.image_ref, p.caption) for p in pairs] == [("x.png", "A red circle"), ("y.png", "two")]
    assert [p.image_key for p in pairs] == [image_key("a"), image_key("b")]
    with pytest.raises(ValueError, match="empty: no training pairs"):
        write_pairs([("a", "x.png", "")], tmp_path / "none.arrow", "empty")


def _loader_memory(pairs: PairFile, items: int) -> int:
    """Peak Python and Arrow bytes while opening `pairs` and reading the first `items` of an epoch."""
    tracemalloc.start()
    try:
        opened = PairFile(pairs.path)
        for count, (index, _) in enumerate(EpochOrder(len(opened), 32, 0, 1, seed=0, epoch=0)):
            opened[index]
            if count == items:
                break
        return tracemalloc.get_traced_memory()[1] + pa.total_allocated_bytes()
    finally:
        tracemalloc.stop()


def test_the_loader_memory_does_not_grow_with_the_number_of_pairs(tmp_path):
    """Ten times the pairs, the same footprint: nothing per pair is built in memory (a list of 300k
    pairs alone would take tens of MB)."""
    small, large = _write(30_000, tmp_path / "small.arrow"), _write(300_000, tmp_path / "large.arrow")
    assert len(large) == 10 * len(small) == 300_000
    assert large[123_456].caption == "a red circle number 123456"
    small_bytes, large_bytes = _loader_memory(small, 2_000), _loader_memory(large, 2_000)
    assert large_bytes < 1_000_000 and large_bytes < 1.5 * small_bytes + 100_000, (small_bytes, large_bytes)


def test_an_item_draws_its_crop_from_its_seed_and_seeds_no_other_generator(tmp_path, monkeypatch):
    """The item seed alone fixes the crop; the caller's CPU random state is left as it was, and no
    accelerator generator is touched (torch.manual_seed per item reseeded CUDA's, and cost ~1 ms each on a
    CPU-only machine, where it queued a seed with a stack trace)."""
    Image.radial_gradient("L").convert("RGB").save(tmp_path / "x.png")
    pairs = write_pairs([("a", "x.png", "a red circle")], tmp_path / "pairs.arrow", "one")
    transform = ImageTransform(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, train=True, min_crop_area=0.3)
    dataset = PairDataset(pairs, tmp_path, transform)

    def refuse(*args, **kwargs):
        raise AssertionError("a training item seeded an accelerator's generator")

    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", refuse)
    monkeypatch.setattr(torch.cuda, "manual_seed", refuse)
    first, again, other = dataset[0, 11], dataset[0, 11], dataset[0, 12]
    assert torch.equal(torch.rand(3), expected_next)
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])
    assert first[1:] == ("a red circle", image_key("a"))
