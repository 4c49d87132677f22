"""BERT WordPiece tokenizer with BLIP's two extra special tokens.

``[ENC]`` replaces ``[CLS]`` for the image-grounded encoder (ITM); ``[DEC]`` is the decoder's
begin-of-sequence token (the tokenizer's ``bos_token``); ``[SEP]`` ends a caption; ``[PAD]`` pads.
As in BLIP, both are appended after the base vocabulary (``[DEC]`` first, then ``[ENC]``), so a real
``bert-base-uncased`` vocabulary gives ids 30522 and 30523 like the released checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import BertWordPieceTokenizer
from transformers import BertTokenizer, PreTrainedTokenizerBase

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
    """Train a lower-case WordPiece vocabulary of at most ``vocab_size`` tokens (specials included) offline.

    The vocabulary can come out smaller when the corpus has fewer distinct pieces.
    """
    if vocab_size < len(BERT_SPECIAL_TOKENS) + 2:
        raise ValueError(f"vocab_size must leave room for the special tokens (got {vocab_size})")
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(
        corpus, vocab_size=vocab_size - 2, min_frequency=1, special_tokens=BERT_SPECIAL_TOKENS
    )
    return _add_blip_tokens(BertTokenizer(vocab=wordpiece.get_vocab()))


def load_tokenizer(path: str | Path) -> BertTokenizer:
    """Load a tokenizer folder: one written by ``save_pretrained``, or a plain BERT ``vocab.txt`` folder.

    ``[ENC]`` and ``[DEC]`` are added when the folder lacks them.
    """
    folder = Path(path)
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
        raise ValueError(f"tokenizer lacks BLIP's special tokens ({ids}); build it with train_tokenizer or "
                         "load_tokenizer")
    return ids


def tokenize(tokenizer: PreTrainedTokenizerBase, captions: list[str], max_length: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] caption [SEP]`` right-padded to the longest caption (truncated to ``max_length``).

    Returns ``input_ids`` and ``attention_mask``, both LongTensor ``(B, L)`` with ``L <= max_length``.
    For ITM put ``special_ids(tokenizer).enc`` in column 0, for the decoder ``.dec``.
    """
    if isinstance(captions, str):
        raise TypeError("tokenize expects a list of captions, not a single string")
    batch = tokenizer(
        list(captions),
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return batch["input_ids"], batch["attention_mask"]
