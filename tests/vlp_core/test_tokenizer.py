import json
import os
import subprocess
import sys

import pytest
import torch

from vlp_core.tokenizer import load_tokenizer, special_ids, tokenize, train_tokenizer

CORPUS = [
    "a large red circle to the left of a small blue square",
    "a small green triangle above a yellow circle",
    "two blue squares on a white background",
] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=200)


def test_special_tokens_follow_bert_then_blip(tokenizer):
    ids = special_ids(tokenizer)
    assert (ids.pad, ids.cls, ids.sep) == (0, 2, 3)
    assert (ids.dec, ids.enc) == (len(tokenizer) - 2, len(tokenizer) - 1)
    assert len(tokenizer) <= 200


def test_tokenize_wraps_pads_and_truncates(tokenizer):
    ids = special_ids(tokenizer)
    input_ids, mask = tokenize(tokenizer, ["A red circle", "a small green triangle above a yellow circle"], 32)
    assert input_ids.dtype == mask.dtype == torch.long
    assert input_ids.shape == mask.shape and input_ids.shape[1] == mask[1].sum()
    assert input_ids[:, 0].tolist() == [ids.cls, ids.cls]
    short_length = int(mask[0].sum())
    assert input_ids[0, short_length - 1] == ids.sep
    assert (input_ids[0, short_length:] == ids.pad).all() and (mask[0, short_length:] == 0).all()
    assert tokenizer.decode(input_ids[0], skip_special_tokens=True) == "a red circle"
    truncated, _ = tokenize(tokenizer, [CORPUS[0]], max_length=5)
    assert truncated.shape == (1, 5) and truncated[0, -1] == ids.sep


def test_unknown_words_map_to_unk(tokenizer):
    input_ids, _ = tokenize(tokenizer, ["zzz"], 8)
    assert tokenizer.unk_token_id in input_ids[0].tolist()


def test_save_and_load_keep_ids(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert special_ids(loaded) == special_ids(tokenizer)
    assert torch.equal(tokenize(loaded, CORPUS[:3], 32)[0], tokenize(tokenizer, CORPUS[:3], 32)[0])


def test_plain_bert_vocab_gets_blip_tokens_appended(tmp_path):
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = load_tokenizer(tmp_path)
    ids = special_ids(tokenizer)
    assert (ids.pad, ids.cls, ids.sep, ids.dec, ids.enc) == (0, 101, 102, len(vocab), len(vocab) + 1)
    assert tokenize(tokenizer, ["A reds"], 8)[0].tolist() == [[101, 104, 105, 106, 102]]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path)


def test_the_same_corpus_gives_the_same_vocabulary_in_every_process():
    script = (
        "import json, sys; from vlp_core.tokenizer import train_tokenizer; "
        f"print(json.dumps(train_tokenizer({CORPUS!r}, vocab_size=60).get_vocab(), sort_keys=True))"
    )
    vocabularies = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2)
    }
    assert len(vocabularies) == 1
    assert json.loads(vocabularies.pop()) == train_tokenizer(CORPUS, vocab_size=60).get_vocab()


def test_words_outside_the_vocabulary_are_spelt_in_known_characters():
    tokenizer = train_tokenizer(CORPUS, vocab_size=60)  # room for the characters and a few whole words
    assert tokenizer.tokenize("circle") == ["circle"] and len(tokenizer) <= 60
    assert tokenizer.tokenize("bluest") == ["blue", "##s", "##t"]  # longest known piece first
