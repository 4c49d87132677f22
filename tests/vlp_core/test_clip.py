import pytest
import torch
from PIL import Image

from vlp_core.checkpoint import UnsafeCheckpointError
from vlp_core.clip import clip_transform, encode_text_to_last_token, load_clip, save_clip

CAPTIONS = [["a red circle", "a blue square", "click to buy"], [], ["a small green triangle"]]


@pytest.fixture(scope="module")
def ranker():
    torch.manual_seed(0)
    return load_clip("clip_tiny")


@pytest.fixture(scope="module")
def images(ranker):
    colors = [(255, 0, 0), (0, 0, 255), (0, 200, 0)]
    return torch.stack([ranker.preprocess(Image.new("RGB", (64, 64), color)) for color in colors])


@pytest.mark.parametrize("model_name", ["clip_tiny", "ViT-B-32"])
def test_the_transform_without_weights_is_the_models_preprocess(model_name):
    image = Image.fromarray((torch.rand(40, 70, 3) * 255).byte().numpy())
    expected = load_clip(model_name).preprocess(image)
    assert torch.equal(clip_transform(model_name)(image), expected), "what decode workers give the ranker"


def test_scores_are_cosine_similarities_per_candidate(ranker, images):
    features = ranker.image_features(images)
    assert features.shape == (3, 64)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    scores = ranker.scores(features, CAPTIONS)
    assert [s.shape for s in scores] == [(3,), (0,), (1,)]

    with torch.no_grad():
        text = ranker.model.encode_text(ranker.tokenizer(["a blue square"]), normalize=True)
        image = ranker.model.encode_image(images[:1], normalize=True)
    assert scores[0][1].item() == pytest.approx((image @ text.t()).item(), abs=1e-5)
    assert all(-1.0 <= s.min() and s.max() <= 1.0 for s in scores if len(s))


@pytest.mark.parametrize("model_name", ["clip_tiny", "ViT-B-32"])
def test_text_features_skip_the_padding_and_equal_open_clips(model_name):
    torch.manual_seed(0)
    ranker = load_clip(model_name)
    captions = ["a blue square", "a large red circle to the left of a small green triangle", ""]
    tokens = ranker.tokenizer(captions)
    widths = []
    hook = ranker.model.transformer.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    with torch.no_grad():
        ours = encode_text_to_last_token(ranker.model, tokens)
        hook.remove()
        whole_context = ranker.model.encode_text(tokens)
    longest = int((tokens != 0).sum(dim=1).max())  # [SOT], words, [EOT] of the longest caption
    assert widths == [longest] and longest < tokens.shape[1]
    torch.testing.assert_close(ours, whole_context, atol=1e-5, rtol=1e-4)


def test_image_features_are_computed_once_per_image(ranker, images):
    calls = []
    encode_image = ranker.model.encode_image

    def counting_encode_image(pixels, **kwargs):
        calls.append(len(pixels))
        return encode_image(pixels, **kwargs)

    ranker.model.encode_image = counting_encode_image
    try:
        features = ranker.image_features(images)
        ranker.scores(features, CAPTIONS)
        ranker.scores(features, [["another caption"]] * 3)
    finally:
        del ranker.model.encode_image
    assert calls == [3]


def test_scores_reject_mismatched_lengths(ranker, images):
    with pytest.raises(ValueError, match="3 images but 2 caption lists"):
        ranker.scores(ranker.image_features(images), CAPTIONS[:2])


def test_save_load_round_trip(ranker, images, tmp_path):
    path = tmp_path / "ranker" / "clip.safetensors"
    save_clip(ranker, path)
    restored = load_clip("clip_tiny", path)
    expected = ranker.scores(ranker.image_features(images), CAPTIONS)
    actual = restored.scores(restored.image_features(images), CAPTIONS)
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b)
    fresh = load_clip("clip_tiny")
    assert not torch.allclose(fresh.scores(fresh.image_features(images), CAPTIONS)[0], expected[0])

    torch.save(ranker.model.state_dict(), tmp_path / "clip.pt")  # tensors-only torch file
    from_torch = load_clip("clip_tiny", tmp_path / "clip.pt")
    torch.testing.assert_close(from_torch.scores(from_torch.image_features(images), CAPTIONS)[0], expected[0])


def test_load_rejects_unsafe_or_wrong_checkpoints(tmp_path):
    pickled = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(1), "payload": object()}, pickled)
    with pytest.raises(UnsafeCheckpointError):
        load_clip("clip_tiny", pickled)
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="does not hold weights for CLIP"):
        load_clip("clip_tiny", wrong)
    with pytest.raises(FileNotFoundError):
        load_clip("clip_tiny", tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="unknown CLIP architecture"):
        load_clip("no-such-clip")
    with pytest.raises(ValueError, match="safetensors"):
        save_clip(load_clip("clip_tiny"), tmp_path / "clip.bin")


def test_contrastive_loss_trains_the_ranker(ranker, images):
    trainee = load_clip("clip_tiny")
    trainee.model.train()
    captions = ["a red image", "a blue image", "a green image"]
    optimizer = torch.optim.AdamW(trainee.model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = trainee.contrastive_loss(images, captions)["contrastive_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    trainee.model.eval()
    scores = trainee.scores(trainee.image_features(images), [captions] * 3)
    assert [int(s.argmax()) for s in scores] == [0, 1, 2]
