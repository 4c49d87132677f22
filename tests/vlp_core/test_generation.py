"""Tests for vlp_core.generation and vlp_core.blip_decoder: token rules, decoding loops against references,
the cached BLIP decoder against full recomputation and against transformers."""

import dataclasses
import itertools
import math

import pytest
import torch

from vlp_core.blip_decoder import BlipDecoder
from vlp_core.generation import (
    DecodingRules,
    apply_repetition_penalty,
    beam_search,
    generate,
    greedy_choice,
    nucleus_choice,
    nucleus_sample,
    row_draws,
    sample_tokens,
    select_beams,
)
from vlp_core.tokenizer import special_ids

# --------------------------------------------------------------------------- pure token rules


def reference_nucleus(probs: list[float], top_p: float) -> list[int]:
    """The definition: the most likely tokens, most likely first, until they hold at least top_p."""
    nucleus, mass = [], 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t]):
        if mass >= top_p:
            break
        nucleus.append(token)
        mass += probs[token]
    return nucleus


def reference_nucleus_sample(probs: torch.Tensor, top_p: float, uniform: torch.Tensor) -> list[int]:
    """Inverse CDF over the nucleus, most likely token first, one row at a time in plain Python."""
    tokens = []
    for row, draw in zip(probs.tolist(), uniform.tolist()):
        nucleus = reference_nucleus(row, top_p)
        target, cumulative = draw * sum(row[t] for t in nucleus), 0.0
        for token in nucleus:
            cumulative += row[token]
            if cumulative > target:
                break
        tokens.append(token)
    return tokens


def test_nucleus_sample_picks_from_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]] * 4)
    sample = lambda p, draws: nucleus_sample(probs, p, torch.tensor(draws)).tolist()  # noqa: E731
    assert sample(0.79, [0.0, 0.62, 0.63, 0.9999]) == [1, 1, 3, 3]  # nucleus {1: 0.5, 3: 0.3}
    assert sample(0.81, [0.0, 0.52, 0.53, 0.99]) == [1, 1, 3, 0]  # nucleus {1, 3, 0}: 0.5 / 0.95 = 0.526
    assert sample(0.01, [0.0, 0.5, 0.9, 0.9999]) == [1, 1, 1, 1]
    assert sample(1.0, [0.0, 0.49, 0.9, 0.9999]) == [1, 1, 0, 2]


@pytest.mark.parametrize("vocab", [10, 300])  # below and above NUCLEUS_CANDIDATES
def test_nucleus_sample_equals_the_definition(vocab):
    generator = torch.Generator().manual_seed(vocab)
    sharpness = torch.tensor([0.1, 1.0, 3.0, 10.0]).repeat(50)[:, None]  # flat rows need the full sort
    probs = (sharpness * torch.randn(len(sharpness), vocab, generator=generator, dtype=torch.float64)).softmax(-1)
    for top_p in (0.5, 0.9, 1.0):
        uniform = torch.rand(len(probs), generator=generator, dtype=torch.float64)
        assert nucleus_sample(probs, top_p, uniform).tolist() == reference_nucleus_sample(probs, top_p, uniform)


def test_nucleus_sample_frequencies():
    probs = torch.tensor([[0.0, 0.25, 0.05, 0.7]]).expand(20000, -1)
    draws = nucleus_sample(probs, 0.9, torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    assert set(draws.tolist()) == {1, 3}
    assert (draws == 3).float().mean().item() == pytest.approx(0.7 / 0.95, abs=0.015)


def test_nucleus_is_the_one_of_transformers():
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = 3 * torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    for top_p in (0.3, 0.9):
        kept = TopPLogitsWarper(top_p)(None, logits).isfinite()
        for row, probs in zip(kept, logits.softmax(dim=-1).tolist()):
            assert sorted(row.nonzero().squeeze(1).tolist()) == sorted(reference_nucleus(probs, top_p))


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[0, 1, 1]])
    penalised = apply_repetition_penalty(logits, seen, 2.0)
    assert penalised.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_select_beams_routes_sep_candidates():
    scores = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]])
    tokens = torch.tensor([[7, 1, 8, 9, 1, 6]])  # [SEP] = 1 at ranks 1 and 4
    finishing, continuing = select_beams(scores, tokens, sep_id=1, num_beams=3)
    assert finishing.tolist() == [[False, True, False, False, False, False]]  # rank 4 is outside the beam
    assert continuing.tolist() == [[0, 2, 3]]


def test_rules_cut_unknown_ids_and_early_sep():
    rules = DecodingRules(sep_id=1, vocab_limit=4, min_length=2, max_length=5)
    logits, history = torch.zeros(1, 6), torch.tensor([[0]])
    assert rules.apply(logits, history, generated=1).isfinite().tolist() == [[True, False, True, True]]
    assert rules.apply(logits, history, generated=2).isfinite().tolist() == [[True, True, True, True]]
    assert logits.isfinite().all()  # the input is left as it was


# --------------------------------------------------------------------------- decoding loops on a toy model

SEP = 1
PROMPT = torch.tensor([0])


class ToyDecoder:
    """A language model whose next-token logits are a fixed random function of (image, prefix)."""

    def __init__(self, num_images: int, vocab: int):
        self.num_images, self.vocab = num_images, vocab
        self.rows: list[tuple[int, tuple[int, ...]]] = []
        self.batch_sizes: list[int] = []

    def logits(self, image: int, prefix: tuple[int, ...]) -> torch.Tensor:
        seed = hash((image, prefix)) % 2**31
        return 2 * torch.randn(self.vocab, generator=torch.Generator().manual_seed(seed))

    def _all_logits(self) -> torch.Tensor:
        self.batch_sizes.append(len(self.rows))
        return torch.stack([self.logits(image, prefix) for image, prefix in self.rows])

    def start(self, copies):
        self.rows = [(image, ()) for image in range(self.num_images) for _ in range(copies)]
        return self._all_logits()

    def step(self, tokens):
        assert len(tokens) == len(self.rows)
        self.rows = [(image, prefix + (token,)) for (image, prefix), token in zip(self.rows, tokens.tolist())]
        return self._all_logits()

    def keep(self, rows):
        self.rows = [self.rows[row] for row in rows.tolist()]


def exhaustive_best(decoder: ToyDecoder, rules: DecodingRules, image: int) -> list[tuple[float, list[int]]]:
    """Every caption the rules allow with its mean log-probability (rules applied to log-probabilities), best first."""
    found = []

    def extend(prefix: tuple[int, ...], total: float) -> None:
        history = torch.tensor([PROMPT.tolist() + list(prefix)])
        log_probs = rules.apply(decoder.logits(image, prefix)[None].log_softmax(-1), history, len(prefix))[0]
        for token in range(len(log_probs)):  # the rules cut ids >= vocab_limit
            if math.isinf(log_probs[token]):
                continue
            caption, score = prefix + (token,), total + log_probs[token].item()
            if token == SEP or len(caption) == rules.max_length:
                found.append((score / len(caption), list(caption)))
            else:
                extend(caption, score)

    extend((), 0.0)
    return sorted(found, key=lambda hypothesis: -hypothesis[0])


def test_wide_beam_search_is_exhaustive():
    rules = DecodingRules(sep_id=SEP, vocab_limit=5, min_length=1, max_length=3)
    decoder = ToyDecoder(num_images=2, vocab=6)
    results = beam_search(decoder, rules, PROMPT, num_images=2, num_beams=25, num_captions=4)
    for image in range(2):
        assert results[image] == [caption for _, caption in exhaustive_best(decoder, rules, image)[:4]]


def test_narrow_beam_search_returns_valid_captions_and_stops_finished_images():
    rules = DecodingRules(sep_id=SEP, vocab_limit=8, min_length=2, max_length=6)
    decoder = ToyDecoder(num_images=3, vocab=8)
    results = beam_search(decoder, rules, PROMPT, num_images=3, num_beams=3, num_captions=2)
    for captions in results:
        assert len(captions) == 2 and captions[0] != captions[1]
        for caption in captions:
            assert 2 <= len(caption) <= 6 and all(token < 8 for token in caption)
            assert SEP not in caption[:-1] and (caption[-1] == SEP or len(caption) == 6)
    assert decoder.batch_sizes[0] == 9 and all(size % 3 == 0 for size in decoder.batch_sizes)


def test_greedy_loop_matches_step_by_step_argmax_and_drops_finished_rows():
    rules = DecodingRules(sep_id=SEP, vocab_limit=4, min_length=0, max_length=8)
    decoder = ToyDecoder(num_images=6, vocab=4)
    results = sample_tokens(decoder, rules, PROMPT, copies=1, choose=greedy_choice)
    for image, caption in enumerate(results):
        prefix = ()
        while not prefix or (prefix[-1] != SEP and len(prefix) < 8):
            history = torch.tensor([PROMPT.tolist() + list(prefix)])
            prefix += (rules.apply(decoder.logits(image, prefix)[None], history, len(prefix)).argmax().item(),)
        assert caption == list(prefix)
    sizes = decoder.batch_sizes
    assert sizes == sorted(sizes, reverse=True) and len(sizes) == max(len(c) for c in results)
    assert sizes[-1] == sum(len(c) == max(len(c) for c in results) for c in results)


@pytest.mark.parametrize("min_length,max_length", [(0, 1), (3, 3), (2, 7)])
def test_sampled_lengths_respect_the_limits(min_length, max_length):
    rules = DecodingRules(sep_id=SEP, vocab_limit=3, min_length=min_length, max_length=max_length)
    draws = row_draws(4, 5, max_length, torch.Generator().manual_seed(0), device=torch.device("cpu"))
    choose = nucleus_choice(0.9, 1.0, draws)
    for caption in sample_tokens(ToyDecoder(num_images=4, vocab=3), rules, PROMPT, copies=5, choose=choose):
        assert SEP not in caption[:-1] and len(caption) <= max_length
        assert caption[-1] == SEP or len(caption) == max_length
        assert len(caption) - (caption[-1] == SEP) >= min_length


# --------------------------------------------------------------------------- the BLIP decoder


@pytest.fixture(scope="module")
def tokenizer(word_tokenizer):
    return word_tokenizer(["a picture of large small red blue green circle square triangle left right the to"])


@pytest.fixture(scope="module")
def model(tokenizer, small_blip):
    model = small_blip(tokenizer)
    with torch.no_grad():  # an untrained model has flat next-token distributions:
        model.text_decoder.cls.predictions.transform.LayerNorm.weight.mul_(20.0)  # peak them,
        model.text_decoder.cls.predictions.bias[special_ids(tokenizer).sep] += 3.0  # and let [SEP] come early
    return model


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class RecomputingDecoder:
    """Reference decoder: re-runs model.lm_logits on every full sequence at every step (no cache)."""

    def __init__(self, model, image_embeds, prompt_ids):
        self.model, self.image_embeds, self.prompt_ids = model, image_embeds, prompt_ids.tolist()
        self.rows: list[tuple[int, list[int]]] = []

    def _logits(self):
        images = torch.tensor([image for image, _ in self.rows])
        ids = torch.tensor([tokens for _, tokens in self.rows])
        return self.model.lm_logits(self.image_embeds[images], ids, torch.ones_like(ids))[:, -1].float()

    def start(self, copies):
        self.rows = [(image, self.prompt_ids) for image in range(len(self.image_embeds)) for _ in range(copies)]
        return self._logits()

    def step(self, tokens):
        self.rows = [(image, ids + [token]) for (image, ids), token in zip(self.rows, tokens.tolist())]
        return self._logits()

    def keep(self, rows):
        self.rows = [self.rows[row] for row in rows.tolist()]


def decoders(model, tokenizer, pixels):
    ids = special_ids(tokenizer)
    prompt = torch.tensor([ids.dec, *tokenizer("a picture of", add_special_tokens=False)["input_ids"]])
    rules = DecodingRules(ids.sep, len(tokenizer), min_length=2, max_length=12)
    with torch.no_grad():
        image_embeds = model.encode_image(pixels)
    cached = BlipDecoder(model, image_embeds, prompt, rules.max_length)
    return rules, prompt, cached, RecomputingDecoder(model, image_embeds, prompt)


def test_cached_logits_equal_full_recomputation(model, tokenizer, pixels):
    _, prompt, cached, reference = decoders(model, tokenizer, pixels)
    # 3 images x 2 rows: drop one row, reorder, repeat a row (as beams do), keep one image only
    keeps = [[0, 1, 3, 4, 5], [3, 0, 2], [1, 1, 0], [2]]
    tokens = torch.tensor([5, 9, 7, 6, 8, 10])
    grids = []  # (width, rows already in grid order) of the cross-attention after each keep
    with torch.no_grad():
        torch.testing.assert_close(cached.start(2), reference.start(2), atol=1e-5, rtol=1e-5)
        for step, keep in enumerate(map(torch.tensor, keeps)):
            torch.testing.assert_close(cached.step(tokens), reference.step(tokens), atol=1e-5, rtol=1e-5)
            cached.keep(keep)
            reference.keep(keep)
            grids.append((cached.width, cached.grid_slot is None))
            if step == 0:
                assert cached.live is not None  # the dropped row's cache slot is not compacted away yet
            tokens = tokens[keep] + 1
        torch.testing.assert_close(cached.step(tokens), reference.step(tokens), atol=1e-5, rtol=1e-5)
    assert grids == [(2, False), (1, False), (2, False), (1, True)]


@pytest.mark.parametrize("method", ["greedy", "nucleus", "beam"])
def test_cached_decoding_equals_recomputing_decoding(model, tokenizer, pixels, method):
    rules, prompt, cached, reference = decoders(model, tokenizer, pixels)
    outputs = []
    with torch.no_grad():
        for decoder in (cached, reference):
            if method == "beam":
                outputs.append(beam_search(decoder, rules, prompt, len(pixels), num_beams=3, num_captions=3))
            else:
                draws = row_draws(
                    len(pixels), 4, rules.max_length, torch.Generator().manual_seed(3), device=torch.device("cpu")
                )
                copies, choose = (1, greedy_choice) if method == "greedy" else (4, nucleus_choice(0.9, 1.0, draws))
                outputs.append(sample_tokens(decoder, rules, prompt, copies, choose))
    assert outputs[0] == outputs[1]
    if method == "nucleus":
        assert len({len(caption) for caption in outputs[0]}) > 2  # rows really finished at different steps


def test_images_matter_to_the_test_model(model, tokenizer, pixels):
    captions = generate(model, tokenizer, pixels, method="greedy", min_length=4, max_length=10)
    assert len({caption for (caption,) in captions}) == 3


def test_generate_encodes_each_image_once_and_computes_cross_attention_once(model, tokenizer, pixels, monkeypatch):
    vision_batches, cross_key_batches = [], []
    cross_keys = {id(layer.crossattention.self.key.weight) for layer in model.text_decoder.bert.encoder.layer}
    linear = torch.nn.functional.linear

    def spying_linear(states, weight, bias=None):  # the decoder calls its layers' weights functionally
        if id(weight) in cross_keys:
            cross_key_batches.append(states.shape[0])
        return linear(states, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spying_linear)
    hook = model.vision_model.register_forward_hook(
        lambda m, args, kwargs, out: vision_batches.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    try:
        captions = generate(model, tokenizer, pixels, num_captions=5, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert vision_batches == [3]
    assert cross_key_batches == [3] * len(model.text_decoder.bert.encoder.layer)
    assert [len(per_image) for per_image in captions] == [5, 5, 5]
    assert all(isinstance(caption, str) for caption in itertools.chain(*captions))


def test_generate_is_reproducible_under_a_seed(model, tokenizer, pixels):
    def run(seed):
        return generate(
            model, tokenizer, pixels, num_captions=4, min_length=3, generator=torch.Generator().manual_seed(seed)
        )

    first = run(0)
    assert first == run(0)
    assert first != run(1)
    assert len({caption for per_image in first for caption in per_image}) > 3  # sampling gives variety


def test_per_image_seeds_make_captions_independent_of_the_batch(model, tokenizer, pixels):
    def run(images, seeds):
        return generate(model, tokenizer, pixels[images], num_captions=3, min_length=2, seeds=seeds)

    together = run([0, 1, 2], [10, 11, 12])
    assert together == [run([image], [10 + image])[0] for image in range(3)]
    assert run([2, 0], [12, 10]) == [together[2], together[0]]
    assert run([0], [99]) != together[:1]


def test_generate_strips_the_prompt_and_restores_training_mode(model, tokenizer, pixels):
    model.train()
    try:
        greedy = generate(model, tokenizer, pixels[:1], method="greedy", min_length=0, max_length=12)
        assert model.training
    finally:
        model.eval()
    with torch.no_grad():
        rules, prompt, cached, _ = decoders(model, tokenizer, pixels[:1])
        rules = dataclasses.replace(rules, min_length=0)
        expected = sample_tokens(cached, rules, prompt, 1, greedy_choice)
    assert greedy == [[tokenizer.decode(expected[0], skip_special_tokens=True)]]
    beams = generate(model, tokenizer, pixels[:2], method="beam", num_beams=3, num_captions=2)
    assert [len(per_image) for per_image in beams] == [2, 2]
    assert generate(model, tokenizer, pixels[:0]) == []


@pytest.mark.parametrize(
    "arguments,message",
    [
        ({"num_captions": 0}, "num_captions must be >= 1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"min_length": 9, "max_length": 8}, "min_length must be in"),
        ({"method": "topk"}, "method must be one of"),
        ({"method": "greedy", "num_captions": 2}, "greedy decoding gives one caption"),
        ({"method": "beam", "num_beams": 2, "num_captions": 3}, "need num_beams >= num_captions"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"max_length": 200}, "exceeds the decoder's 64 positions"),
        ({"seeds": [1, 2]}, "one seed per image"),
        ({"seeds": [1, 2, 3], "generator": torch.Generator()}, "cannot be combined with generator"),
    ],
)
def test_generate_rejects_bad_arguments(model, tokenizer, pixels, arguments, message):
    with pytest.raises(ValueError, match=message):
        generate(model, tokenizer, pixels, **arguments)


def test_generate_rejects_bad_pixels(model, tokenizer):
    with pytest.raises(ValueError, match=r"pixel_values must be \(N, 3, H, W\)"):
        generate(model, tokenizer, torch.zeros(3, 32, 32))


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_matches_transformers_generate_on_the_exported_captioner(model, tokenizer, pixels, tmp_path, method):
    checkpoint = pytest.importorskip("vlp_core.checkpoint")
    from transformers import BlipForConditionalGeneration

    checkpoint.export_hf_captioner(model, tokenizer, tmp_path)
    hf_model = BlipForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = special_ids(tokenizer)
    prompt = [ids.dec, *tokenizer("a picture of", add_special_tokens=False)["input_ids"], ids.sep]  # HF drops [SEP]
    with torch.no_grad():
        hf_output = hf_model.generate(
            pixel_values=pixels,
            input_ids=torch.tensor([prompt] * len(pixels)),
            min_new_tokens=3,
            max_new_tokens=10,
            do_sample=False,
            num_beams=1 if method == "greedy" else 3,
        )
    expected = [[tokenizer.decode(row[len(prompt) - 1 :], skip_special_tokens=True)] for row in hf_output]
    ours = generate(
        model, tokenizer, pixels, method=method, num_beams=3, min_length=3, max_length=10, prompt="a picture of"
    )
    assert ours == expected
    assert len({caption for (caption,) in ours}) > 1
