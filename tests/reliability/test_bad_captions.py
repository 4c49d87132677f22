"""Bad web captions on their way into training: cleaned, or dropped with a count, and capped in length."""

from hostile_web import BAD_CAPTIONS, HostileDownload

from pipelines.training.data import MAX_CAPTION_CHARS, generation_triples, write_pairs
from vlp_core.tokenizer import tokenize, train_tokenizer


def test_training_pairs_clean_drop_and_cap_bad_captions(hostile_download: HostileDownload, tmp_path) -> None:
    """Of the kept rows, the empty / whitespace captions are dropped; every other caption is clean and
    capped; the tokenizer truncates the longest to the model's max_length."""
    pairs = list(write_pairs(generation_triples(hostile_download.generation), tmp_path / "pairs.arrow", "hostile"))
    kept = [row for row in hostile_download.rows.values() if row["kept"]]
    assert len(pairs) == len(kept) - 2  # caption_empty and caption_whitespace
    captions = [pair.caption for pair in pairs]
    assert all(0 < len(caption) <= MAX_CAPTION_CHARS for caption in captions)
    assert all(caption.isprintable() and "\ufffd" not in caption and "<" not in caption for caption in captions)
    longest = max(captions, key=len)
    assert longest.startswith("a red circle a red circle") and len(BAD_CAPTIONS["caption_10kB"]) > 10_000

    tokenizer = train_tokenizer(captions, vocab_size=120)
    input_ids, attention_mask = tokenize(tokenizer, captions, max_length=30)
    assert input_ids.shape == attention_mask.shape == (len(captions), 30)
    assert int(attention_mask.sum(dim=1).max()) == 30  # the long caption fills it, and no more
