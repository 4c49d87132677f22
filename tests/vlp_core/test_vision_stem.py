"""The conv stem (vlp_core/vision_stem.py): as many patch tokens as ViT's stem, BatchNorm statistics that a
checkpoint carries, and inference that never depends on an image's batchmates (BatchNorm in training mode
would make it so)."""

import pytest
import torch

from vlp_core.blip import BlipModel
from vlp_core.checkpoint import export_hf_captioner, load_checkpoint, save_checkpoint
from vlp_core.generation import generate
from vlp_core.scoring import score_captions
from vlp_core.vision_stem import ConvStem

CAPTIONS = [["a red circle", "a blue square"], ["a green triangle"], ["a yellow circle above a square"]]


@pytest.fixture(scope="module")
def tokenizer(word_tokenizer):
    return word_tokenizer(caption for captions in CAPTIONS for caption in captions)


@pytest.fixture
def model(tokenizer, small_blip):
    """A conv-stem model whose BatchNorm running statistics have moved off their initial (0, 1)."""
    model = small_blip(tokenizer, stem="conv").train()
    with torch.no_grad():
        for seed in range(3):
            model.encode_image(images(4, seed) * 3 + 1)
    return model.eval()


def images(count: int = len(CAPTIONS), seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("patch_size", "convolutions"), [(4, 2), (8, 3), (16, 4)])
def test_conv_stem_makes_the_patch_stems_token_grid(patch_size, convolutions):
    stem = ConvStem(hidden_size=64, patch_size=patch_size)
    assert stem(torch.randn(2, 3, 64, 64)).shape == (2, 64, 64 // patch_size, 64 // patch_size)
    assert sum(isinstance(layer, torch.nn.Conv2d) for layer in stem.modules()) == convolutions + 1  # + the 1×1


def test_the_tiny_preset_sees_through_the_conv_stem():
    model = BlipModel.from_preset("tiny").eval()
    assert isinstance(model.vision_model.embeddings.patch_embedding, ConvStem)
    size = model.config.vision.image_size
    assert model.encode_image(torch.randn(2, 3, size, size)).shape == (2, 1 + (size // 16) ** 2, 128)


def test_a_checkpoint_carries_the_batchnorm_statistics(model, tokenizer, tmp_path):
    statistics = {name: value for name, value in model.state_dict().items() if "running_" in name}
    assert statistics and not any(torch.equal(value, torch.zeros_like(value)) for value in statistics.values())
    save_checkpoint(model, tokenizer, tmp_path / "model")
    loaded, _, _ = load_checkpoint(tmp_path / "model")
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    torch.testing.assert_close(loaded.eval().encode_image(images()), model.encode_image(images()), rtol=0, atol=0)


def test_scores_and_captions_of_an_image_do_not_depend_on_its_batchmates(model, tokenizer):
    model.train()  # as a caller might hand it over: inference must switch BatchNorm to its running statistics
    with torch.no_grad():  # in training mode the batch changes an image's embedding ...
        alone, batched = model.encode_image(images()[:1]), model.encode_image(images())[:1]
    assert not torch.allclose(alone, batched, atol=1e-3)
    scores = score_captions(model, tokenizer, images(), CAPTIONS)  # ... in inference it must not
    for index in range(len(CAPTIONS)):
        [own] = score_captions(model, tokenizer, images()[index : index + 1], CAPTIONS[index : index + 1])
        assert own.itm == pytest.approx(scores[index].itm, abs=1e-5)
        assert own.itc == pytest.approx(scores[index].itc, abs=1e-5)
    captions = generate(model, tokenizer, images(), method="greedy", max_length=6)
    assert generate(model, tokenizer, images()[1:2], method="greedy", max_length=6) == captions[1:2]
    assert model.training, "the caller's mode is given back"


def test_a_conv_stem_model_does_not_export_to_transformers_layout(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="conv stem has no transformers BLIP counterpart"):
        export_hf_captioner(model, tokenizer, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
