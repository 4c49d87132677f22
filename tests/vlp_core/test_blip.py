import copy
import dataclasses

import pytest
import torch
from transformers.models.blip.modeling_blip import BlipVisionModel

from vlp_core.blip import BlipModel
from vlp_core.config import load_preset
from vlp_core.vision_attention import SdpaVisionAttention, use_fused_attention

BATCH, LENGTH = 4, 12


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BlipModel.from_preset("tiny").eval()


@pytest.fixture(scope="module")
def inputs(model):
    generator = torch.Generator().manual_seed(1)
    size = model.config.vision.image_size
    pixels = torch.randn(BATCH, 3, size, size, generator=generator)
    input_ids = torch.randint(5, model.config.text.vocab_size, (BATCH, LENGTH), generator=generator)
    return pixels, input_ids, torch.ones_like(input_ids)


def test_shapes_and_normalised_features(model, inputs):
    pixels, input_ids, mask = inputs
    config = model.config
    with torch.no_grad():
        image_embeds = model.encode_image(pixels)
        text_embeds = model.encode_text(input_ids, mask)
        assert image_embeds.shape == (BATCH, 1 + config.vision.num_patches, config.vision.hidden_size)
        assert text_embeds.shape == (BATCH, LENGTH, config.text.hidden_size)
        for features in (model.image_features(image_embeds), model.text_features(text_embeds)):
            assert features.shape == (BATCH, config.embed_dim)
            assert torch.allclose(features.norm(dim=-1), torch.ones(BATCH), atol=1e-5)
        assert model.itm_logits(image_embeds, input_ids, mask).shape == (BATCH, 2)
        assert model.lm_logits(image_embeds, input_ids, mask).shape == (BATCH, LENGTH, config.text.vocab_size)
    assert model.temp.shape == () and model.temp.item() == pytest.approx(config.temp)


def _shared_and_own(model):
    encoder, decoder = model.text_encoder, model.text_decoder.bert
    shared = [(encoder.embeddings, decoder.embeddings)]
    own = []
    for enc_layer, dec_layer in zip(encoder.encoder.layer, decoder.encoder.layer):
        shared += [
            (enc_layer.crossattention, dec_layer.crossattention),
            (enc_layer.intermediate, dec_layer.intermediate),
            (enc_layer.output, dec_layer.output),
        ]
        own.append((enc_layer.attention, dec_layer.attention))
    return shared, own


def _pointers(module):
    return [parameter.data_ptr() for parameter in module.parameters()]


def test_decoder_shares_everything_but_self_attention(model):
    shared, own = _shared_and_own(model)
    for encoder_module, decoder_module in shared:
        assert _pointers(encoder_module) == _pointers(decoder_module)
    for encoder_module, decoder_module in own:
        assert not set(_pointers(encoder_module)) & set(_pointers(decoder_module))
    head = model.text_decoder.cls.predictions
    assert head.decoder.weight.data_ptr() == model.text_encoder.embeddings.word_embeddings.weight.data_ptr()
    assert head.decoder.bias.data_ptr() == head.bias.data_ptr()
    # parameters() counts every shared tensor once: the decoder adds only self-attention and its LM head
    decoder_only = sum(p.numel() for _, m in own for p in m.parameters()) + sum(
        p.numel() for p in (head.bias, *head.transform.parameters())
    )
    encoder_total = sum(p.numel() for p in model.text_encoder.parameters())
    text_total = sum(p.numel() for p in set(model.text_encoder.parameters()) | set(model.text_decoder.parameters()))
    assert text_total == encoder_total + decoder_only


def test_decoder_gradient_reaches_shared_cross_attention(inputs):
    torch.manual_seed(0)
    model = BlipModel.from_preset("tiny")
    pixels, input_ids, mask = inputs
    model.lm_logits(model.encode_image(pixels), input_ids, mask).square().mean().backward()
    cross_attention = model.text_encoder.encoder.layer[0].crossattention.self.query.weight
    assert cross_attention.grad is not None and cross_attention.grad.abs().sum() > 0
    assert model.text_encoder.encoder.layer[0].attention.self.query.weight.grad is None


def test_unimodal_encoder_skips_cross_attention(inputs):
    torch.manual_seed(0)
    model = BlipModel.from_preset("tiny").eval()
    pixels, input_ids, mask = inputs
    with torch.no_grad():
        image_embeds = model.encode_image(pixels)
        text_before = model.encode_text(input_ids, mask)
        itm_before = model.itm_logits(image_embeds, input_ids, mask)
        for layer in model.text_encoder.encoder.layer:
            layer.crossattention.self.value.weight.add_(torch.randn_like(layer.crossattention.self.value.weight))
        assert torch.equal(model.encode_text(input_ids, mask), text_before)
        assert not torch.allclose(model.itm_logits(image_embeds, input_ids, mask), itm_before, atol=1e-3)


def test_decoder_is_causal_and_encoder_bidirectional(model, inputs):
    pixels, input_ids, mask = inputs
    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % model.config.text.vocab_size
    with torch.no_grad():
        image_embeds = model.encode_image(pixels)
        logits, logits_changed = (model.lm_logits(image_embeds, ids, mask) for ids in (input_ids, changed))
        assert torch.allclose(logits[:, :-1], logits_changed[:, :-1], atol=1e-5)
        assert not torch.allclose(logits[:, -1], logits_changed[:, -1], atol=1e-3)
        itm, itm_changed = (model.itm_logits(image_embeds, ids, mask) for ids in (input_ids, changed))
        assert not torch.allclose(itm, itm_changed, atol=1e-4)


def test_padding_is_ignored(model, inputs):
    _, input_ids, mask = inputs
    padded_ids = torch.cat([input_ids, torch.zeros(BATCH, 3, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(BATCH, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = model.encode_text(input_ids, mask)
        padded = model.encode_text(padded_ids, padded_mask)
    assert torch.allclose(plain, padded[:, :LENGTH], atol=1e-5)


def test_outputs_depend_on_the_image(model, inputs):
    pixels, input_ids, mask = inputs
    with torch.no_grad():
        image_embeds = model.encode_image(pixels)
        swapped = image_embeds.flip(0)
        assert not torch.allclose(
            model.itm_logits(image_embeds, input_ids, mask), model.itm_logits(swapped, input_ids, mask), atol=1e-4
        )
        assert not torch.allclose(
            model.lm_logits(image_embeds, input_ids, mask), model.lm_logits(swapped, input_ids, mask), atol=1e-4
        )


def test_bad_shapes_are_clear_errors(model, inputs):
    pixels, input_ids, mask = inputs
    size = model.config.vision.image_size
    with pytest.raises(ValueError, match=rf"pixel_values must be \(B, 3, {size}, {size}\).*got \(4, 3, 32, 32\)"):
        model.encode_image(pixels[:, :, :32, :32])
    with pytest.raises(ValueError, match="must both be \\(B, L\\)"):
        model.encode_text(input_ids, mask[:, :-1])
    too_long = torch.ones(1, model.config.text.max_position + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceed text.max_position=64"):
        model.lm_logits(model.encode_image(pixels[:1]), too_long, too_long)


def test_deepcopy_keeps_the_ties(model):
    twin = copy.deepcopy(model)
    encoder_layer, decoder_layer = twin.text_encoder.encoder.layer[0], twin.text_decoder.bert.encoder.layer[0]
    assert decoder_layer.crossattention is encoder_layer.crossattention
    assert (
        twin.text_encoder.embeddings.word_embeddings.weight.data_ptr()
        != model.text_encoder.embeddings.word_embeddings.weight.data_ptr()
    )


def test_base_preset_builds_with_the_paper_sizes():
    config = load_preset("base")
    with torch.device("meta"):
        model = BlipModel(config)
    vision = sum(p.numel() for p in model.vision_model.parameters())
    assert 85e6 < vision < 88e6  # ViT-B/16
    assert model.vision_proj.out_features == 256 and model.text_decoder.config.vocab_size == 30524


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_under_bf16_autocast(inputs):
    model = BlipModel.from_preset("tiny").cuda()
    pixels, input_ids, mask = (tensor.cuda() for tensor in inputs)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        image_embeds = model.encode_image(pixels)
        logits = model.lm_logits(image_embeds, input_ids, mask)
        itm = model.itm_logits(image_embeds, input_ids, mask)
    assert logits.shape == (BATCH, LENGTH, model.config.text.vocab_size) and torch.isfinite(logits).all()
    assert itm.device.type == "cuda" and torch.isfinite(itm.float()).all()


def test_swapping_in_the_fused_attention_draws_no_random_numbers():
    config = dataclasses.replace(load_preset("tiny").vision, stem="patch").to_hf()
    vision = BlipVisionModel(config)
    weights = {name: tensor.clone() for name, tensor in vision.state_dict().items()}
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    use_fused_attention(vision)
    assert torch.equal(torch.rand(3), expected), "the same seed still gives the same model"
    assert all(torch.equal(vision.state_dict()[name], tensor) for name, tensor in weights.items())
    assert all(type(layer.self_attn) is SdpaVisionAttention for layer in vision.encoder.layers)


def test_the_vit_attention_keeps_transformers_weights_and_its_fused_path_equals_the_eager_one():
    torch.manual_seed(0)
    model = BlipModel.from_preset("tiny").train()
    attention = model.vision_model.encoder.layers[0].self_attn
    assert {name for name, _ in attention.named_parameters()} == {"qkv.weight", "qkv.bias", "projection.weight",
                                                                   "projection.bias"}  # fmt: skip
    hidden = torch.randn(3, 17, model.config.vision.hidden_size, requires_grad=True)
    eager = attention(hidden)[0]  # on the CPU: transformers' eager attention
    fused = attention.fused(hidden)  # on a GPU: scaled_dot_product_attention
    torch.testing.assert_close(fused, eager, atol=1e-6, rtol=1e-5)
    (eager_grad,) = torch.autograd.grad(eager.square().sum(), hidden)
    (fused_grad,) = torch.autograd.grad(fused.square().sum(), hidden)
    torch.testing.assert_close(fused_grad, eager_grad, atol=1e-5, rtol=1e-4)
