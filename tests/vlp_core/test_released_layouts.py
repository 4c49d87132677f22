"""Released BLIP folders (stand-ins built by tests/released_models.py) load as they are, say what they
hold, and give transformers' outputs; broken ones are refused with a message naming the file."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from released_models import IMAGE_SIZE, released_captioner, released_filter
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from vlp_core.checkpoint import (
    CAPTIONER_NEEDS,
    FILTER_NEEDS,
    CheckpointError,
    check_checkpoint,
    checkpoint_config,
    checkpoint_parts,
    convert_hf,
    file_digest,
    load_checkpoint,
    require_parts,
)
from vlp_core.generation import generate
from vlp_core.scoring import score_captions
from vlp_core.tokenizer import special_ids, tokenize

CAPTIONS = [["a red circle", "a small blue square to the left of a triangle"], ["the green triangle"]]


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("released")
    return {"captioner": released_captioner(folder / "captioner"), "filter": released_filter(folder / "filter")}


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


def test_a_released_captioner_captions_as_transformers_does(released, pixels):
    model, tokenizer, digest = load_checkpoint(released["captioner"])
    assert digest == file_digest(released["captioner"] / "model.safetensors")
    assert len(tokenizer) == 30524 and special_ids(tokenizer).dec == 30522 and special_ids(tokenizer).cls == 101
    ours = generate(model, tokenizer, pixels, method="greedy", min_length=0, max_length=8)
    hf_model = BlipForConditionalGeneration.from_pretrained(released["captioner"]).eval()
    ids = special_ids(tokenizer)
    prompt = [ids.dec, *tokenizer(model.config.prompt, add_special_tokens=False)["input_ids"], ids.sep]
    with torch.no_grad():  # transformers drops the prompt's last token, as users call it
        output = hf_model.generate(
            pixel_values=pixels, input_ids=torch.tensor([prompt] * len(pixels)), max_new_tokens=8, do_sample=False
        )
    theirs = tokenizer.batch_decode(output[:, len(prompt) - 1 :], skip_special_tokens=True)
    assert [captions[0] for captions in ours] == theirs
    assert all(theirs)


def test_a_folders_config_is_read_without_its_weights(released, tmp_path):
    for folder in released.values():
        model, tokenizer, _ = load_checkpoint(folder)
        assert checkpoint_config(folder) == model.config
        converted = tmp_path / folder.name
        convert_hf(folder, converted)
        assert checkpoint_config(converted) == model.config


def test_a_released_filter_scores_as_transformers_does_with_enc_in_column_0(released, pixels):
    model, tokenizer, _ = load_checkpoint(released["filter"])
    ours = score_captions(model, tokenizer, pixels, CAPTIONS)
    hf_model = BlipForImageTextRetrieval.from_pretrained(released["filter"]).eval()
    for image, texts in enumerate(CAPTIONS):
        input_ids, mask = tokenize(tokenizer, texts, model.config.max_text_length)
        itm_ids = input_ids.clone()
        itm_ids[:, 0] = special_ids(tokenizer).enc  # the filter's convention (transformers' processor puts [CLS])
        image_pixels = pixels[image : image + 1].expand(len(texts), -1, -1, -1)
        with torch.no_grad():
            itm = hf_model(input_ids=itm_ids, pixel_values=image_pixels, attention_mask=mask).itm_score.softmax(-1)
            itc = hf_model(
                input_ids=input_ids, pixel_values=pixels[image : image + 1], attention_mask=mask, use_itm_head=False
            ).itm_score[0]
        assert ours[image].itm == pytest.approx(itm[:, 1].tolist(), abs=1e-5)
        assert ours[image].itc == pytest.approx(itc.tolist(), abs=1e-5)


def test_a_checkpoint_says_which_parts_are_random_and_a_stage_refuses_them(released, tmp_path):
    assert checkpoint_parts(released["captioner"])["itm_head"] == "random"
    assert checkpoint_parts(released["filter"])["lm_head"] == "random"
    require_parts(released["captioner"], CAPTIONER_NEEDS, "the caption stage")
    require_parts(released["filter"], FILTER_NEEDS, "the filter stage")
    with pytest.raises(CheckpointError, match=r"captioner: its itc_projections and itm_head are initialised at random"):
        require_parts(released["captioner"], FILTER_NEEDS, "the filter stage")
    with pytest.raises(CheckpointError, match=r"filter: its lm_head is initialised at random"):
        require_parts(released["filter"], CAPTIONER_NEEDS, "the caption stage")

    digest = convert_hf(released["filter"], tmp_path / "converted")  # converted once, the parts travel along
    assert checkpoint_parts(tmp_path / "converted") == checkpoint_parts(released["filter"])
    assert load_checkpoint(tmp_path / "converted")[2] == digest


def _copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / folder.name
    copy.mkdir()
    for path in folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled",))


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "config.json").unlink(), r"config.json is missing"),
    (lambda f: (f / "config.json").write_text("{not json"), r"config.json: not a JSON file"),
    (lambda f: (f / "model.safetensors").unlink(), r"no weights file \(model.safetensors or pytorch_model.bin\)"),
    (lambda f: (f / "model.safetensors").write_bytes(b""), r"model.safetensors: not a readable safetensors file"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-1000]),
     r"model.safetensors: not a readable safetensors file"),
    (lambda f: _replace_weights(f, lambda state: {**state, "itm_head.weight": torch.zeros(3, 32)}),
     r"does not fit its config: wrong shapes: \[.itm_head.weight \(3, 32\)"),
    (lambda f: ((f / "model.safetensors").unlink(), (f / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload()))),
     r"pytorch_model.bin: it contains pickled Python objects"),
    (lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                            "architectures": ["BlipForQuestionAnswering"]})),
     r"architecture 'BlipForQuestionAnswering' is not supported"),
])  # fmt: skip
def test_broken_folders_are_refused_before_any_work_naming_the_file(released, tmp_path, damage, message):
    folder = _copy(released["filter"], tmp_path)
    damage(folder)
    with pytest.raises(CheckpointError, match=message) as error:
        check_checkpoint(folder)
    assert str(folder) in str(error.value) and "\n" not in str(error.value)


def _replace_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    save_file(change(load_file(path)), path)
