import dataclasses
import json

import pytest
import torch

from vlp_core.blip import BlipModel
from vlp_core.config import BlipConfig, TextConfig, VisionConfig, load_preset, preset_names


def test_presets_are_listed_and_round_trip():
    assert {"tiny", "base", "large"} <= set(preset_names())
    for name in preset_names():
        config = load_preset(name)
        assert config.name == name
        assert BlipConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_base_and_large_match_the_paper():
    base, large = load_preset("base"), load_preset("large")
    assert (base.vision.image_size, base.vision.patch_size, base.vision.hidden_size) == (224, 16, 768)
    assert (base.embed_dim, base.queue_size, base.momentum, base.alpha, base.temp) == (256, 57600, 0.995, 0.4, 0.07)
    assert (large.vision.hidden_size, large.vision.num_layers) == (1024, 24)
    assert large.text == base.text


def test_tiny_is_small():
    tiny = load_preset("tiny")
    assert (tiny.vision.image_size, tiny.vision.patch_size, tiny.vision.stem) == (48, 16, "conv")
    assert tiny.vision.hidden_size <= 128 and tiny.text.hidden_size <= 128
    assert tiny.vision.num_layers == 1 and 2 <= tiny.text.num_layers <= 4
    assert tiny.vision.num_patches == 9
    assert tiny.min_crop_area == 1.0  # whole images: a crop can cut off an object at the edge


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_a_model_starts_from_its_text_initializer_range(std):
    tiny = load_preset("tiny")
    config = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, initializer_range=std))
    torch.manual_seed(0)
    query = BlipModel(config).text_encoder.encoder.layer[0].attention.self.query.weight
    assert query.std().item() == pytest.approx(std, rel=0.05)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"available presets: \['base', 'large', 'tiny'"):
        load_preset("huge")


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"vision": {"patch_size": 7, "stem": "patch"}}, r"VisionConfig.patch_size must be a divisor of image_size=48"),
        ({"vision": {"patch_size": 2}}, r"VisionConfig.patch_size must be a power of two"),
        ({"vision": {"stem": "resnet"}}, r"VisionConfig.stem must be one of patch, conv"),
        ({"vision": {"num_heads": 3}}, r"VisionConfig.num_heads must be a divisor of hidden_size=128"),
        ({"text": {"vocab_size": 0}}, r"TextConfig.vocab_size must be a positive integer"),
        ({"text": {"dropout": 1.5}}, r"TextConfig.dropout must be in \[0, 1\)"),
        ({"text": {"initializer_range": 0}}, r"TextConfig.initializer_range must be a number in \(0, 1\]"),
        ({"text": {"initializer_range": "0.1"}}, r"TextConfig.initializer_range must be a number"),
        ({"momentum": 1.0}, r"BlipConfig.momentum must be in \(0, 1\)"),
        ({"temp": 0.0}, r"BlipConfig.temp"),
        ({"max_text_length": 65}, r"max_text_length must be at most text.max_position=64"),
        ({"image_std": [0.5, 0.5]}, r"BlipConfig.image_std must be three numbers"),
        ({"min_crop_area": 0.0}, r"BlipConfig.min_crop_area must be in \(0, 1\]"),
        ({"min_crop_area": 1.5}, r"BlipConfig.min_crop_area must be in \(0, 1\]"),
        ({"queue_siz": 3}, r"unknown field\(s\) \['queue_siz'\]"),
        ({"text": {"layers": 3}}, r"TextConfig: unknown field\(s\) \['layers'\]"),
    ],
)
def test_bad_fields_name_the_field(patch, message):
    data = load_preset("tiny").to_dict()
    for key, value in patch.items():
        if isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    with pytest.raises(ValueError, match=message):
        BlipConfig.from_dict(data)


def test_missing_section_and_missing_field():
    with pytest.raises(ValueError, match="'vision' and 'text' sections"):
        BlipConfig.from_dict({"text": {}})
    data = load_preset("tiny").to_dict()
    del data["vision"]["num_heads"]
    with pytest.raises(ValueError, match="num_heads"):
        BlipConfig.from_dict(data)


def test_hf_config_round_trip():
    tiny = load_preset("tiny")
    patch_tower = dataclasses.replace(tiny.vision, stem="patch")
    assert VisionConfig.from_hf(patch_tower.to_hf()) == patch_tower
    with pytest.raises(ValueError, match="conv stem has no transformers BLIP counterpart"):
        tiny.vision.to_hf()
    hf_text = tiny.text.to_hf(encoder_hidden_size=tiny.vision.hidden_size, pad_id=0, bos_id=7, sep_id=3)
    assert TextConfig.from_hf(hf_text) == tiny.text
    assert (hf_text.encoder_hidden_size, hf_text.bos_token_id, hf_text.eos_token_id) == (128, 7, 3)
