"""Captioner backends on stand-ins of their released folders: K captions per image, seeded per image, the same
captions as calling the released model directly, and clear errors for a wrong folder."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from released_captioners import RELEASED_CAPTIONERS
from transformers import AutoProcessor

from vlp_core.captioners import (
    BACKENDS,
    Sampling,
    captioner_digest,
    captioner_transform,
    check_captioner,
    load_captioner,
)
from vlp_core.captioners.vlm import KINDS
from vlp_core.checkpoint import CheckpointError, save_checkpoint
from vlp_core.generation import generate

SAMPLING = Sampling(num_captions=3, min_length=2, max_length=8)
GREEDY = Sampling(num_captions=1, top_p=1e-9, min_length=2, max_length=8)  # a nucleus of one token: greedy
COLOURS = [(200, 30, 30), (30, 30, 200), (30, 200, 30), (220, 220, 40)]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    torch.manual_seed(0)
    return [Image.fromarray((torch.rand(48, 56, 3) * 255).byte().numpy()).convert("RGB") for _ in COLOURS]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, small_blip, word_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("captioners")
    tokenizer = word_tokenizer(["a red circle", "a blue square"])
    built = {name: build(root / name) for name, build in RELEASED_CAPTIONERS.items()}
    save_checkpoint(small_blip(tokenizer), tokenizer, root / "blip")
    return {"blip": root / "blip", **built}


@pytest.fixture(scope="module")
def captioners(folders: dict[str, Path]) -> dict:
    return {name: load_captioner(name, folder) for name, folder in folders.items()}


def pixels_of(captioner, images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([captioner.transform(image) for image in images])


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_seeded_captions_per_image_independent_of_the_batch(backend, captioners, folders, images):
    captioner = captioners[backend]
    pixels = pixels_of(captioner, images)
    without_model = captioner_transform(backend, folders[backend])  # what the decode workers run
    assert torch.equal(torch.stack([without_model(image) for image in images]), pixels)
    captions = captioner.caption(pixels, [11, 12, 13, 14], SAMPLING)
    assert [len(per_image) for per_image in captions] == [3, 3, 3, 3]
    assert all(isinstance(caption, str) for per_image in captions for caption in per_image)
    assert captioner.caption(pixels, [11, 12, 13, 14], SAMPLING) == captions  # reproducible
    assert captioner.caption(pixels[2:], [13, 14], SAMPLING) == captions[2:]  # an image's captions: its seed's
    assert captioner.caption(pixels[:1], [99], SAMPLING) != captions[:1]  # another seed draws others
    assert len({caption for per_image in captions for caption in per_image}) > 4  # sampled, not one sentence
    assert captioner.model_ref.startswith("sha256:")
    assert captioner_digest(backend, folders[backend]) == captioner.model_ref
    with pytest.raises(ValueError, match="one seed per image"):
        captioner.caption(pixels, [11, 12, 13], SAMPLING)


def test_the_backends_defaults_and_prompts(captioners, folders):
    assert {name: captioners[name].prompt for name in ("blip2", "instructblip", "llava", "coca")} == {
        "blip2": None,
        "instructblip": KINDS["instructblip"].default_prompt,
        "llava": KINDS["llava"].default_prompt,
        "coca": None,
    }
    assert captioners["blip"].prompt == captioners["blip"].model.config.prompt
    prompted = load_captioner("llava", folders["llava"], prompt="Write a caption.")
    assert prompted.prompt == "Write a caption."
    assert prompted.prompt_inputs["input_ids"].shape != captioners["llava"].prompt_inputs["input_ids"].shape


def test_blip_backend_is_capfilts_generate(captioners, images):
    captioner = captioners["blip"]
    pixels = pixels_of(captioner, images)
    direct = generate(
        captioner.model, captioner.tokenizer, pixels, num_captions=3, min_length=2, max_length=8, seeds=[1, 2, 3, 4]
    )
    assert captioner.caption(pixels, [1, 2, 3, 4], SAMPLING) == direct


@pytest.mark.parametrize("backend", sorted(KINDS))
def test_transformers_backends_caption_as_the_released_model_does(backend, captioners, folders, images):
    """A one-token nucleus is greedy decoding: the captions must be those of the model's own `generate`
    called on the processor's inputs, as its model card shows."""
    captioner = captioners[backend]
    processor = AutoProcessor.from_pretrained(folders[backend])
    text = captioner.prompt or ""
    if KINDS[backend].chat:
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        text = processor.apply_chat_template(turn, add_generation_prompt=True)
    inputs = processor(images=images, text=[text] * len(images), return_tensors="pt")
    with torch.no_grad():
        output = captioner.model.generate(**inputs, do_sample=False, max_new_tokens=8, min_new_tokens=2)
    direct = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    ours = captioner.caption(pixels_of(captioner, images), [0, 1, 2, 3], GREEDY)
    assert ours == [[caption.strip()] for caption in direct]


def test_coca_captions_as_its_decoder_does(captioners, images):
    """open_clip's `CoCa.generate` cannot run beside transformers 5 (it imports the removed BeamSearchScorer);
    the reference is its top-1 loop written out: the whole text so far through the model at each step."""
    captioner = captioners["coca"]
    pixels = pixels_of(captioner, images)
    start, end = captioner.tokenizer.sot_token_id, captioner.tokenizer.eot_token_id
    tokens = torch.full((len(pixels), 1), start)
    with torch.no_grad():
        for step in range(GREEDY.max_length):
            logits = captioner.model(pixels, tokens, output_labels=False)["logits"][:, -1]
            if step < GREEDY.min_length:
                logits[:, end] = float("-inf")
            tokens = torch.cat([tokens, logits.argmax(dim=-1, keepdim=True)], dim=1)
    direct = [captioner.tokenizer.decode(row[1:].tolist()).split("<end_of_text>")[0].strip() for row in tokens]
    assert captioner.caption(pixels, [0, 1, 2, 3], GREEDY) == [[caption] for caption in direct]


def test_a_folder_of_another_model_is_refused_with_the_backend_to_use(folders, tmp_path):
    with pytest.raises(CheckpointError, match="use --backend blip2"):
        check_captioner("llava", folders["blip2"])
    with pytest.raises(CheckpointError, match="open_clip_config.json is missing"):
        check_captioner("coca", folders["llava"])
    with pytest.raises(CheckpointError, match="config.json is missing"):
        check_captioner("instructblip", folders["coca"])
    with pytest.raises(ValueError, match="unknown captioner backend 'blip3'; known: blip, blip2"):
        check_captioner("blip3", folders["blip"])
    with pytest.raises(ValueError, match="is not a model folder"):
        check_captioner("blip2", tmp_path / "missing")


def test_a_folder_without_weights_or_processor_is_refused(folders, tmp_path):
    for name in ("config.json", "processor_config.json", "model.safetensors"):
        (tmp_path / "llava").mkdir(exist_ok=True)
        (tmp_path / "llava" / name).write_bytes((folders["llava"] / name).read_bytes())
    (tmp_path / "llava" / "processor_config.json").unlink()
    with pytest.raises(CheckpointError, match="no processor"):
        check_captioner("llava", tmp_path / "llava")
    (tmp_path / "llava" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        check_captioner("llava", tmp_path / "llava")
    config = json.loads((folders["coca"] / "open_clip_config.json").read_text())
    del config["model_cfg"]["multimodal_cfg"]
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a CoCa model"):
        check_captioner("coca", tmp_path / "clip")
