"""Streaming tallies for the report: they take a generation's captions part by part, and their memory grows
with what they count (8 bytes per distinct word, n-gram or caption), not with the number of rows.

Words are `metrics.simple_tokenize`'s. Distinct n-grams and captions are counted by 64-bit keys: words get
exact ids, an n-gram's key mixes its word ids and a caption's key hashes its words, so two different ones
share a key with probability about 2^-64 per pair.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.report.metrics import simple_tokenize

NGRAM_ORDERS = (1, 2, 3, 4)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class DistinctCount:
    """How many distinct uint64 keys were added: a sorted array of the keys seen, merged in batches."""

    MERGE_AT = 1 << 20  # pending keys (8 MB) before they are merged into the sorted array

    def __init__(self) -> None:
        self._seen = np.empty(0, dtype=np.uint64)
        self._pending: list[np.ndarray] = []
        self._n_pending = 0

    def add(self, keys: np.ndarray) -> None:
        self._pending.append(np.asarray(keys, dtype=np.uint64))
        self._n_pending += len(keys)
        if self._n_pending >= self.MERGE_AT:
            self._merge()

    def __len__(self) -> int:
        self._merge()
        return len(self._seen)

    def _merge(self) -> None:
        if not self._pending:
            return
        # two sorted runs: the stable sort (timsort) merges them in linear time
        merged = np.sort(np.concatenate([self._seen, np.unique(np.concatenate(self._pending))]), kind="stable")
        first = np.ones(len(merged), dtype=bool)
        first[1:] = merged[1:] != merged[:-1]
        self._seen, self._pending, self._n_pending = merged[first], [], 0


@dataclass(frozen=True)
class Tokens:
    """Captions as word ids: `words` (W,) int64 back to back, `lengths` (C,) words per caption, `caption_keys`
    (C,) uint64 keys of the captions' word sequences."""

    words: np.ndarray
    lengths: np.ndarray
    caption_keys: np.ndarray

    def select(self, mask: np.ndarray) -> Tokens:
        """The captions where the (C,) boolean `mask` is true."""
        return Tokens(self.words[np.repeat(mask, self.lengths)], self.lengths[mask], self.caption_keys[mask])

    def ngram_keys(self, n: int) -> np.ndarray:
        """(G,) uint64 keys of every n-gram that fits inside its caption."""
        ends = np.cumsum(self.lengths)
        starts = np.arange(len(self.words))
        caption_end = np.repeat(ends, self.lengths)
        starts = starts[starts + n <= caption_end]
        key = self.words[starts].astype(np.uint64)
        for offset in range(1, n):
            key = _mix(key * _GOLDEN + self.words[starts + offset].astype(np.uint64) + np.uint64(1))
        return key


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that spreads every input bit over the output."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Vocabulary:
    """Word → id, shared by every tally of one report so that ids (and so n-gram keys) agree."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    def tokenize(self, captions: Iterable[str | None]) -> Tokens:
        """Tokens of `captions`; a missing caption reads as empty."""
        words, lengths, keys = [], [], []
        for caption in captions:
            text = simple_tokenize(caption or "")
            split = text.split()
            words.extend(self._ids.setdefault(word, len(self._ids)) for word in split)
            lengths.append(len(split))
            keys.append(hash(text))  # the words joined by single spaces: equal word sequences, equal keys
        return Tokens(
            np.array(words, dtype=np.int64),
            np.array(lengths, dtype=np.int64),
            np.array(keys, dtype=np.int64).view(np.uint64),
        )


class TextTally:
    """Length histogram, vocabulary, distinct n-grams and duplicate rate of the captions added."""

    def __init__(self) -> None:
        self.captions = 0
        self.length_counts = np.zeros(0, dtype=np.int64)
        self.ngram_totals = dict.fromkeys(NGRAM_ORDERS, 0)
        self.distinct_ngrams = {n: DistinctCount() for n in NGRAM_ORDERS}  # 1-grams are the vocabulary
        self.distinct_captions = DistinctCount()

    def add(self, tokens: Tokens) -> None:
        self.captions += len(tokens.lengths)
        counts = np.bincount(tokens.lengths)
        size = max(len(counts), len(self.length_counts))
        self.length_counts = np.pad(self.length_counts, (0, size - len(self.length_counts)))
        self.length_counts[: len(counts)] += counts
        for n in NGRAM_ORDERS:
            keys = tokens.ngram_keys(n)
            self.ngram_totals[n] += len(keys)
            self.distinct_ngrams[n].add(keys)
        self.distinct_captions.add(tokens.caption_keys)

    def figures(self) -> dict[str, Any]:
        """The report's text figures: a duplicate is a caption whose words equal an earlier one's."""
        distinct = {n: len(self.distinct_ngrams[n]) for n in NGRAM_ORDERS}
        words = int(np.dot(np.arange(len(self.length_counts)), self.length_counts))
        return {
            "captions": self.captions,
            "empty": int(self.length_counts[0]) if len(self.length_counts) else 0,
            "mean_length": words / self.captions if self.captions else None,
            "length_histogram": self.length_counts.tolist(),
            "vocabulary": distinct[1],
            "distinct_ngrams": {str(n): distinct[n] for n in NGRAM_ORDERS},
            "distinct_ngram_ratio": {
                str(n): distinct[n] / self.ngram_totals[n] if self.ngram_totals[n] else None for n in NGRAM_ORDERS
            },
            "duplicate_rate": 1 - len(self.distinct_captions) / self.captions if self.captions else None,
        }


def text_stats(captions: Iterable[str | None]) -> dict[str, Any]:
    """`TextTally.figures` of `captions` on their own."""
    tally = TextTally()
    tally.add(Vocabulary().tokenize(captions))
    return tally.figures()
