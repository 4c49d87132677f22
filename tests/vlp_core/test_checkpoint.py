import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

from vlp_core.blip import BlipModel
from vlp_core.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    export_hf_captioner,
    export_hf_filter,
    file_digest,
    import_hf,
    load_checkpoint,
    load_state_dict_file,
    save_checkpoint,
)
from vlp_core.config import load_preset
from vlp_core.tokenizer import special_ids, train_tokenizer

CORPUS = ["a large red circle to the left of a small blue square", "a small green triangle above a yellow circle"] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=120)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    tiny = load_preset("tiny")  # with ViT's patch stem: these tests convert it to transformers' layout
    model = BlipModel(
        dataclasses.replace(tiny, vision=dataclasses.replace(tiny.vision, patch_size=8, stem="patch"))
    ).eval()
    with torch.no_grad():  # move every parameter off its init value so that round trips are meaningful
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def batch(model, tokenizer):
    torch.manual_seed(1)
    size = model.config.vision.image_size
    pixels = torch.randn(3, 3, size, size)
    input_ids = torch.randint(5, len(tokenizer) - 2, (3, 9))
    mask = torch.ones_like(input_ids)
    mask[0, 6:] = 0
    return pixels, input_ids, mask


def _differing(first: torch.nn.Module, second: torch.nn.Module) -> list[str]:
    other = second.state_dict()
    return [name for name, tensor in first.state_dict().items() if not torch.equal(tensor, other[name])]


def test_save_load_round_trip_restores_weights_ties_and_digest(model, tokenizer, tmp_path):
    digest = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 16
    assert save_checkpoint(model, tokenizer, tmp_path / "again") == digest  # a function of the weights only
    loaded, loaded_tokenizer, loaded_digest = load_checkpoint(tmp_path / "ckpt")
    assert loaded_digest == digest and loaded.config == model.config
    assert _differing(model, loaded) == []
    assert loaded.text_decoder.bert.encoder.layer[1].output is loaded.text_encoder.encoder.layer[1].output
    assert loaded.text_decoder.cls.predictions.decoder.weight is loaded.text_encoder.embeddings.word_embeddings.weight
    assert special_ids(loaded_tokenizer) == special_ids(tokenizer)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["again", "ckpt"]  # no staging folders left


def test_digest_changes_with_the_weights_and_detects_tampering(model, tokenizer, tmp_path):
    digest = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    changed = BlipModel(model.config)
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.itm_head.bias.add_(1e-3)
    assert save_checkpoint(changed, tokenizer, tmp_path / "changed") != digest
    os.replace(tmp_path / "changed" / "model.safetensors", tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(ValueError, match="weights were modified"):
        load_checkpoint(tmp_path / "ckpt")


def test_tokenizer_larger_than_the_vocabulary_is_refused(model, tmp_path):
    big = train_tokenizer([f"word{i} token{i}" for i in range(2000)], vocab_size=4000)
    with pytest.raises(ValueError, match="text.vocab_size is 1024"):
        save_checkpoint(model, big, tmp_path / "ckpt")


def test_load_takes_transformers_folders_as_they_are(model, tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path)
    export_hf_filter(model, tokenizer, tmp_path / "hf")
    loaded, _, digest = load_checkpoint(tmp_path / "hf")
    imported, _ = import_hf(tmp_path / "hf")
    assert digest == file_digest(tmp_path / "hf" / "model.safetensors")
    assert _differing(loaded.text_encoder, imported.text_encoder) == []  # the LM head transform is drawn anew
    assert torch.equal(loaded.itm_head.weight, model.itm_head.weight)


def test_hf_captioner_matches_lm_logits_and_generates(model, tokenizer, batch, tmp_path):
    export_hf_captioner(model, tokenizer, tmp_path)
    hf_model = BlipForConditionalGeneration.from_pretrained(tmp_path).eval()
    pixels, input_ids, mask = batch
    input_ids = input_ids.clone()
    input_ids[:, 0] = special_ids(tokenizer).dec
    with torch.no_grad():
        ours = model.lm_logits(model.encode_image(pixels), input_ids, mask)
        theirs = hf_model(pixel_values=pixels, input_ids=input_ids, attention_mask=mask).logits
        generated = hf_model.generate(pixel_values=pixels, max_new_tokens=4, do_sample=False)
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert generated[:, 0].tolist() == [special_ids(tokenizer).dec] * 3
    processor = BlipProcessor.from_pretrained(tmp_path)
    inputs = processor(images=[torch.zeros(3, 90, 70, dtype=torch.uint8)], text=["a red circle"], return_tensors="pt")
    size = model.config.vision.image_size
    assert inputs["pixel_values"].shape == (1, 3, size, size)
    assert inputs["input_ids"][0, 0] == special_ids(tokenizer).cls


def test_hf_filter_matches_itm_and_itc(model, tokenizer, batch, tmp_path):
    export_hf_filter(model, tokenizer, tmp_path)
    hf_model = BlipForImageTextRetrieval.from_pretrained(tmp_path).eval()
    pixels, input_ids, mask = batch
    itm_ids = input_ids.clone()
    itm_ids[:, 0] = special_ids(tokenizer).enc
    with torch.no_grad():
        image_embeds = model.encode_image(pixels)
        ours_itm = model.itm_logits(image_embeds, itm_ids, mask).softmax(-1)
        theirs_itm = hf_model(input_ids=itm_ids, pixel_values=pixels, attention_mask=mask).itm_score.softmax(-1)
        ours_itc = model.image_features(image_embeds) @ model.text_features(model.encode_text(input_ids, mask)).T
        theirs_itc = hf_model(
            input_ids=input_ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False
        ).itm_score
    assert torch.allclose(ours_itm, theirs_itm, atol=1e-4)
    assert torch.allclose(ours_itc, theirs_itc, atol=1e-4)


def test_import_of_export_gives_back_the_exported_parts(model, tokenizer, tmp_path):
    export_hf_captioner(model, tokenizer, tmp_path / "captioner")
    export_hf_filter(model, tokenizer, tmp_path / "filter")
    captioner, captioner_tokenizer = import_hf(tmp_path / "captioner")
    filter_model, _ = import_hf(tmp_path / "filter")
    assert special_ids(captioner_tokenizer) == special_ids(tokenizer)
    assert captioner.config.vision == model.config.vision and captioner.config.text == model.config.text
    assert filter_model.temp.item() == model.temp.item()

    decoder_self_attention = {name for name in model.state_dict() if "text_decoder" in name and ".attention." in name}
    encoder_self_attention = {name for name in model.state_dict() if "text_encoder" in name and ".attention." in name}
    not_in_captioner = encoder_self_attention | {
        name for name in model.state_dict() if "_proj." in name or "itm_head" in name
    }
    lm_head_own = {name for name in model.state_dict() if name.startswith("text_decoder.cls.")} - {
        "text_decoder.cls.predictions.decoder.weight"
    }  # the output matrix is the shared word embedding
    not_in_filter = decoder_self_attention | lm_head_own
    assert set(_differing(model, captioner)) <= not_in_captioner
    assert set(_differing(model, filter_model)) <= not_in_filter
    assert "text_encoder.encoder.layer.0.attention.self.query.weight" in _differing(model, captioner)
    # the captioner's encoder self-attention starts as a copy of the decoder's
    assert not _differing(
        captioner.text_encoder.encoder.layer[0].attention, captioner.text_decoder.bert.encoder.layer[0].attention
    )


def test_import_of_a_foreign_folder_derives_the_config(model, tokenizer, tmp_path):
    export_hf_filter(model, tokenizer, tmp_path)
    config_path = tmp_path / "config.json"
    hf_config = json.loads(config_path.read_text())
    del hf_config["capfilt_config"]
    config_path.write_text(json.dumps(hf_config))
    imported, _ = import_hf(tmp_path)
    assert imported.config.vision == model.config.vision and imported.config.text == model.config.text
    assert imported.config.embed_dim == model.config.embed_dim and imported.config.name == tmp_path.name
    assert torch.equal(imported.itm_head.weight, model.itm_head.weight)


def test_import_rejects_other_architectures(model, tokenizer, tmp_path):
    export_hf_filter(model, tokenizer, tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    hf_config["architectures"] = ["BlipForQuestionAnswering"]
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(ValueError, match="'BlipForQuestionAnswering' is not supported"):
        import_hf(tmp_path)


class _RunsShellOnUnpickle:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_state_dict_files_load_safely(tmp_path):
    tensors = {"weight": torch.arange(6.0).reshape(2, 3)}
    save_file(tensors, tmp_path / "weights.safetensors")
    torch.save(tensors, tmp_path / "weights.pt")
    for name in ("weights.safetensors", "weights.pt"):
        assert torch.equal(load_state_dict_file(tmp_path / name)["weight"], tensors["weight"])

    marker = tmp_path / "pwned"
    torch.save({"weight": tensors["weight"], "payload": _RunsShellOnUnpickle(marker)}, tmp_path / "evil.bin")
    with pytest.raises(UnsafeCheckpointError, match="can run arbitrary code"):
        load_state_dict_file(tmp_path / "evil.bin")
    assert not marker.exists()

    torch.save({"weight": tensors["weight"], "step": 3}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match="flat state dict of tensors"):
        load_state_dict_file(tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match="expected .safetensors, .pt, .pth or .bin"):
        load_state_dict_file(tmp_path / "weights.ckpt")
