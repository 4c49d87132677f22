"""BERT WordPiece tokenizer with BLIP's two extra special tokens.

``[ENC]`` replaces ``[CLS]`` for the image-grounded encoder (ITM); ``[DEC]`` is the decoder's
begin-of-sequence token (the tokenizer's ``bos_token``); ``[SEP]`` ends a caption; ``[PAD]`` pads.
As in BLIP, both are appended after the base vocabulary (``[DEC]`` first, then ``[ENC]``), so a real
``bert-base-uncased`` vocabulary gives ids 30522 and 30523 like the released checkpoints.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from transformers import BertTokenizer, PreTrainedTokenizerBase

from vlp_core.storage import Location, local_copy, location

TOKENIZER_COMMIT = ("tokenizer_config.json",)  # written last to a remote folder: the folder is complete
ENC_TOKEN = "[ENC]"
DEC_TOKEN = "[DEC]"
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    cls: int
    sep: int
    enc: int
    dec: int


def _add_blip_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add ``[DEC]`` (as bos) and ``[ENC]`` unless present; returns the same tokenizer."""
    if tokenizer.bos_token != DEC_TOKEN:
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    if ENC_TOKEN not in tokenizer.all_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    return tokenizer


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> BertTokenizer:
    """A lower-case WordPiece vocabulary of at most ``vocab_size`` tokens (specials included), built offline.

    Deterministic (the same corpus gives the same ids in every process): after the special tokens come
    the characters seen, as word starts and as ``##`` continuations (most frequent first), then whole
    words by frequency (ties alphabetical) while room is left. A word outside the vocabulary is spelt
    in characters; a character never seen is ``[UNK]``. The vocabulary is smaller when the corpus is.
    """
    room = vocab_size - len(BERT_SPECIAL_TOKENS) - 2  # [DEC] and [ENC] come last
    if room < 1:
        raise ValueError(f"vocab_size must leave room for the special tokens (got {vocab_size})")
    normalizer, splitter = BertNormalizer(lowercase=True), BertPreTokenizer()
    words = Counter(word for text in corpus for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    characters: Counter[str] = Counter()
    for word, count in words.items():
        for character in word:
            characters[character] += count
    by_frequency = sorted(characters, key=lambda c: (-characters[c], c))
    pieces = [*by_frequency, *(f"##{c}" for c in by_frequency)]
    pieces += sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    vocabulary = [*BERT_SPECIAL_TOKENS, *pieces[:room]]
    return _add_blip_tokens(BertTokenizer(vocab={token: i for i, token in enumerate(vocabulary)}))


def load_tokenizer(path: str | Path | Location) -> BertTokenizer:
    """Load a tokenizer folder (local or remote): one written by ``save_pretrained``, or a plain BERT
    ``vocab.txt`` folder. ``[ENC]`` and ``[DEC]`` are added when the folder lacks them.
    """
    folder = local_copy(location(path))
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.txt").is_file():
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {folder}; pass a tokenizer folder")
    return _add_blip_tokens(BertTokenizer.from_pretrained(str(folder)))


def special_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    ids = SpecialIds(
        pad=tokenizer.pad_token_id,
        cls=tokenizer.cls_token_id,
        sep=tokenizer.sep_token_id,
        enc=tokenizer.convert_tokens_to_ids(ENC_TOKEN),
        dec=tokenizer.convert_tokens_to_ids(DEC_TOKEN),
    )
    if tokenizer.unk_token_id in (ids.enc, ids.dec) or None in vars(ids).values():
        raise ValueError(
            f"tokenizer lacks BLIP's special tokens ({ids}); build it with train_tokenizer or load_tokenizer"
        )
    return ids


def tokenize(
    tokenizer: PreTrainedTokenizerBase, captions: list[str], max_length: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] caption [SEP]`` right-padded to the longest caption (truncated to ``max_length``).

    Returns ``input_ids`` and ``attention_mask``, both LongTensor ``(B, L)`` on ``device`` with
    ``L <= max_length``. For ITM put ``special_ids(tokenizer).enc`` in column 0, for the decoder ``.dec``.
    """
    if isinstance(captions, str):
        raise TypeError("tokenize expects a list of captions, not a single string")
    batch = tokenizer(
        list(captions),
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_token_type_ids=False,
    )
    return (
        torch.tensor(batch["input_ids"], dtype=torch.long, device=device),
        torch.tensor(batch["attention_mask"], dtype=torch.long, device=device),
    )
