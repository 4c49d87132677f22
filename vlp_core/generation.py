"""Batched captioning with BLIP's image-grounded decoder: nucleus sampling, greedy and beam search.

Work per call, for N images and K captions (or beams) each:
- each image is encoded once, and the prompt runs once per image; that pass also computes the
  decoder's cross-attention keys/values, which stay per image: the K rows of an image attend to them
  together (one rows x patches product, rows <= K), so they are neither repeated nor copied per row;
- each step feeds one new token per unfinished row; self-attention keys/values go into a preallocated
  cache, and logits are computed only for ids the tokenizer can decode;
- rows that have finished are dropped from the batch together with their cache entries, and an
  image whose rows have all finished is dropped from the cross-attention cache;
- nucleus sampling ranks only the most likely tokens (a full sort only when they hold < top_p).
The decoder reads the weights of transformers' BLIP modules and calls them as functions: the same
arithmetic, without their per-call overhead (cache objects, masks, module hooks).

Lengths count caption tokens after the prompt: every caption has at least `min_length` tokens before
its [SEP], and at most `max_length` tokens, [SEP] included.

Determinism: the same inputs, batch and generator seed give the same captions. With one seed per
image (`seeds`) an image's captions do not depend on the batch it is in: each image draws all its
uniforms from its own generator, and on the CPU in float32 its captions are identical across batch
sizes and orders (tested). Under CUDA bf16, batched kernels round differently per batch shape, so a
rare draw that falls on a probability boundary can still flip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from vlp_core.blip import BlipModel
from vlp_core.blip_decoder import BlipDecoder
from vlp_core.inference import inference_mode
from vlp_core.tokenizer import special_ids

METHODS = ("nucleus", "greedy", "beam")
NEG_INF = float("-inf")
NUCLEUS_CANDIDATES = 32  # tokens ranked first by nucleus sampling; a trained captioner's nucleus is far smaller

# --------------------------------------------------------------------------- token rules


def nucleus_sample(probs: torch.Tensor, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling: (B, V) probabilities and (B,) draws in [0, 1) -> (B,) token ids.

    The nucleus is the smallest set of most likely tokens whose probabilities sum to at least `top_p`
    (the most likely token always belongs to it). A draw picks a token by inverse CDF over the nucleus in
    decreasing order of probability. Only the `NUCLEUS_CANDIDATES` most likely tokens are ranked; the
    rows whose candidates hold less than `top_p` are ranked over the whole vocabulary.
    """
    top, ids = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    tokens = _nucleus_pick(top, ids, top_p, uniform)
    if top.shape[-1] < probs.shape[-1]:
        short = (top.sum(dim=-1) < top_p).nonzero().squeeze(1)
        if len(short):
            tokens[short] = _nucleus_pick(*probs[short].sort(dim=-1, descending=True), top_p, uniform[short])
    return tokens


def _nucleus_pick(top: torch.Tensor, ids: torch.Tensor, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw over the nucleus of (B, C) probabilities sorted in decreasing order, with their ids."""
    in_nucleus = top.cumsum(dim=-1) - top < top_p  # the more likely tokens hold less than top_p
    cdf = (top * in_nucleus).cumsum(dim=-1)
    targets = uniform.to(cdf).unsqueeze(1) * cdf[:, -1:]
    picks = torch.searchsorted(cdf, targets, right=True).clamp(max=top.shape[-1] - 1)
    return ids.gather(1, picks).squeeze(1)


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty, as in transformers: for every token id in `previous_ids` (B, T),
    a positive logit is divided by `penalty` and a negative one multiplied. Returns new (B, V) logits."""
    if penalty == 1.0:
        return logits
    seen = logits.gather(1, previous_ids)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, previous_ids, seen)


def select_beams(
    scores: torch.Tensor, tokens: torch.Tensor, sep_id: int, num_beams: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the best candidates of each image, sorted best first: scores and tokens (n, C), C >= 2W.

    Returns `finishing` (n, C) bool: candidates that end with [SEP] and rank among the first W (as in
    transformers' beam search), and `continuing` (n, W): positions of the W best candidates without [SEP]
    (each beam proposes [SEP] at most once, so there are always W of them).
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    is_sep = tokens == sep_id
    finishing = is_sep & (positions < num_beams) & scores.isfinite()
    continuing = (is_sep.long() * tokens.shape[1] + positions).argsort(dim=1)[:, :num_beams]
    return finishing, continuing


@dataclass(frozen=True)
class DecodingRules:
    """What every method applies to next-token logits: ids the tokenizer cannot decode
    (>= vocab_limit) are cut off, [SEP] waits for `min_length` tokens, repeats are penalised."""

    sep_id: int
    vocab_limit: int
    min_length: int
    max_length: int
    repetition_penalty: float = 1.0

    def apply(self, logits: torch.Tensor, history: torch.Tensor, generated: int) -> torch.Tensor:
        """(B, V) float logits, (B, T) prompt + tokens so far, of which `generated` are new
        -> (B, vocab_limit) logits (a new tensor or a view: `logits` itself is never modified)."""
        logits = apply_repetition_penalty(logits[:, : self.vocab_limit], history, self.repetition_penalty)
        if generated < self.min_length:
            logits = logits.index_fill(1, torch.tensor([self.sep_id], device=logits.device), NEG_INF)
        return logits


# --------------------------------------------------------------------------- the decoder interface


class TokenDecoder(Protocol):
    """Incremental next-token logits for a batch of rows (the loops below only need this)."""

    def start(self, copies: int) -> torch.Tensor:
        """Run the prompt (once per decoder); every image becomes `copies` consecutive rows. -> (N * copies, V)."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token (B,) to every row. -> (B, V) logits of the token after it."""

    def keep(self, rows: torch.Tensor) -> None:
        """Keep (and reorder to) these rows only, e.g. drop finished ones or follow beam parents."""


# --------------------------------------------------------------------------- decoding loops

RowDraws = Callable[[], torch.Tensor]  # the next step's uniform draws in [0, 1), one per row: (N * copies,)
TokenChooser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (B, V) logits, (B,) row ids -> (B,) tokens


def row_draws(
    num_images: int,
    copies: int,
    steps: int,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
    *,
    device: torch.device,
) -> RowDraws:
    """Uniform draws for all N * copies rows and `steps` steps, drawn up front (finished rows keep
    theirs, so nothing shifts) and placed on `device` (the rows'); each call returns the next step's.

    With `seeds` (one per image) image i's rows draw from their own CPU generator seeded with seeds[i]:
    its captions then do not depend on which other images share the batch, nor on the device. Otherwise
    every row draws from `generator` (torch's global CPU generator when None), on the generator's device.
    """
    if seeds is not None and len(seeds) != num_images:
        raise ValueError(f"seeds must hold one seed per image: {num_images} images, {len(seeds)} seeds")
    if seeds is None:
        source = generator.device if generator is not None else torch.device("cpu")
        table = torch.rand(steps, num_images * copies, generator=generator, device=source)
    else:
        table = torch.cat(
            [torch.rand(steps, copies, generator=torch.Generator().manual_seed(seed), device="cpu") for seed in seeds],
            dim=1,
        )
    return iter(table.to(device)).__next__


def greedy_choice(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def nucleus_choice(top_p: float, temperature: float, draws: RowDraws) -> TokenChooser:
    """Sample from the top-p nucleus of softmax(logits / temperature) with each row's own draw."""

    def choose(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        scaled = logits if temperature == 1.0 else logits / temperature
        return nucleus_sample(scaled.softmax(dim=-1), top_p, draws()[rows])

    return choose


def sample_tokens(
    decoder: TokenDecoder, rules: DecodingRules, prompt_ids: torch.Tensor, copies: int, choose: TokenChooser
) -> list[list[int]]:
    """Greedy or sampled decoding of `copies` rows per image. Returns the new token ids of each row
    (N * copies lists, image-major), [SEP] included when produced."""
    logits = decoder.start(copies)
    history = prompt_ids.expand(len(logits), -1)
    rows = torch.arange(len(logits), device=logits.device)
    results: list[list[int]] = [[] for _ in range(len(logits))]
    for generated in range(rules.max_length):
        next_ids = choose(rules.apply(logits, history, generated), rows)
        history = torch.cat([history, next_ids.unsqueeze(1)], dim=1)
        done = (next_ids == rules.sep_id) | (generated + 1 == rules.max_length)
        for row, token_ids in zip(rows[done].tolist(), history[done, len(prompt_ids) :].tolist(), strict=True):
            results[row] = token_ids
        alive = (~done).nonzero().squeeze(1)
        if len(alive) == 0:
            break
        if len(alive) < len(done):
            decoder.keep(alive)
            history, rows, next_ids = history[alive], rows[alive], next_ids[alive]
        logits = decoder.step(next_ids)
    return results


def beam_search(
    decoder: TokenDecoder,
    rules: DecodingRules,
    prompt_ids: torch.Tensor,
    num_images: int,
    num_beams: int,
    num_captions: int,
) -> list[list[list[int]]]:
    """Beam search scoring a caption by its mean token log-probability (length penalty 1).

    As in transformers, the rules apply to the model's log-probabilities: a [SEP] held back by
    min_length does not make the other tokens more likely.

    An image stops when it has `num_beams` finished captions and no live beam can still beat the worst
    of them (transformers' default heuristic). Returns, per image, the `num_captions` best token lists.
    """
    width = num_beams
    logits = decoder.start(width)
    history = prompt_ids.expand(len(logits), -1)
    beam_scores = torch.full((num_images, width), NEG_INF, device=logits.device)
    beam_scores[:, 0] = 0.0  # the W copies are identical: expand only the first
    images = list(range(num_images))  # images still searching, in row order
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(num_images)]
    for generated in range(rules.max_length):
        length = generated + 1
        log_probs = rules.apply(logits.log_softmax(dim=-1), history, generated)  # masks do not renormalise
        vocab = log_probs.shape[-1]
        log_probs = log_probs.view(len(images), width, vocab)
        candidates = (beam_scores.unsqueeze(2) + log_probs).view(len(images), width * vocab)
        scores, flat = candidates.topk(min(2 * width, width * vocab), dim=1)
        parents, tokens = flat // vocab, flat % vocab
        finishing, continuing = select_beams(scores, tokens, rules.sep_id, width)
        if length == rules.max_length:  # out of room: live beams finish as they are
            finishing.scatter_(1, continuing, scores.gather(1, continuing).isfinite())
        for slot, candidate in finishing.nonzero().tolist():
            row = slot * width + parents[slot, candidate].item()
            token_ids = history[row, len(prompt_ids) :].tolist() + [tokens[slot, candidate].item()]
            finished[images[slot]].append((scores[slot, candidate].item() / length, token_ids))
        for image in images:
            finished[image] = sorted(finished[image], key=lambda hypothesis: -hypothesis[0])[:width]
        best_live = (scores.gather(1, continuing[:, :1]).squeeze(1) / length).tolist()
        searching = [
            slot
            for slot, image in enumerate(images)
            if length < rules.max_length and not _settled(finished[image], best_live[slot], width)
        ]
        if not searching:
            break
        kept = torch.tensor(searching, device=scores.device)
        picks = continuing[kept]
        rows = (kept.unsqueeze(1) * width + parents[kept].gather(1, picks)).view(-1)
        next_ids = tokens[kept].gather(1, picks).view(-1)
        beam_scores = scores[kept].gather(1, picks)
        history = torch.cat([history[rows], next_ids.unsqueeze(1)], dim=1)
        images = [images[slot] for slot in searching]
        decoder.keep(rows)
        logits = decoder.step(next_ids)
    return [[token_ids for _, token_ids in hypotheses[:num_captions]] for hypotheses in finished]


def _settled(hypotheses: list[tuple[float, list[int]]], best_live_score: float, width: int) -> bool:
    """True when an image has `width` finished (score, tokens), best first, and its best live beam
    scores no better than the worst of them."""
    return len(hypotheses) == width and best_live_score <= hypotheses[-1][0]


# --------------------------------------------------------------------------- entry point


def generate(
    model: BlipModel,
    tokenizer: PreTrainedTokenizerBase,
    pixel_values: torch.Tensor,
    *,
    num_captions: int = 1,
    method: str = "nucleus",
    top_p: float = 0.9,
    temperature: float = 1.0,
    min_length: int = 5,
    max_length: int = 30,
    repetition_penalty: float = 1.0,
    num_beams: int = 3,
    prompt: str | None = None,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
) -> list[list[str]]:
    """Caption N images (N, 3, H, W): returns N lists of `num_captions` strings, prompt stripped.

    method: "nucleus" (BLIP's CapFilt sampler; uses top_p, temperature and generator or seeds), "greedy"
    (one caption per image) or "beam" (uses num_beams >= num_captions). prompt defaults to
    model.config.prompt. seeds: one per image, making each image's captions independent of its batch.
    """
    prompt = model.config.prompt if prompt is None else prompt
    _check_arguments(num_captions, method, top_p, temperature, min_length, max_length, repetition_penalty, num_beams)
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be (N, 3, H, W), got shape {tuple(pixel_values.shape)}")
    ids = special_ids(tokenizer)
    prompt_ids = [ids.dec, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    positions = model.config.text.max_position
    if len(prompt_ids) + max_length > positions:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens with [DEC]) + max_length ({max_length}) exceeds the "
            f"decoder's {positions} positions; lower max_length"
        )
    if seeds is not None and (generator is not None or len(seeds) != len(pixel_values)):
        raise ValueError(
            f"seeds must hold one seed per image ({len(pixel_values)}, got {len(seeds)}) and "
            "cannot be combined with generator"
        )
    if len(pixel_values) == 0:
        return []
    rules = DecodingRules(
        ids.sep, min(len(tokenizer), model.config.text.vocab_size), min_length, max_length, repetition_penalty
    )
    with inference_mode(model) as device:
        prompt_tensor = torch.tensor(prompt_ids, device=device)
        decoder = BlipDecoder(
            model, model.encode_image(pixel_values.to(device)), prompt_tensor, max_length, rules.vocab_limit
        )
        if method == "beam":
            per_image = beam_search(decoder, rules, prompt_tensor, len(pixel_values), num_beams, num_captions)
        else:
            draws = row_draws(len(pixel_values), num_captions, max_length, generator, seeds, device=device)
            choose = greedy_choice if method == "greedy" else nucleus_choice(top_p, temperature, draws)
            rows = sample_tokens(decoder, rules, prompt_tensor, num_captions, choose)
            per_image = [rows[i : i + num_captions] for i in range(0, len(rows), num_captions)]
    return [tokenizer.batch_decode(token_lists, skip_special_tokens=True) for token_lists in per_image]


def _check_arguments(
    num_captions: int,
    method: str,
    top_p: float,
    temperature: float,
    min_length: int,
    max_length: int,
    repetition_penalty: float,
    num_beams: int,
) -> None:
    """Raise ValueError naming the first bad argument and what it must be."""
    problems = [
        (method in METHODS, f"method must be one of {METHODS}, got {method!r}"),
        (num_captions >= 1, f"num_captions must be >= 1, got {num_captions}"),
        (0.0 < top_p <= 1.0, f"top_p must be in (0, 1], got {top_p}"),
        (temperature > 0.0, f"temperature must be > 0, got {temperature}"),
        (max_length >= 1, f"max_length must be >= 1, got {max_length}"),
        (0 <= min_length <= max_length, f"min_length must be in [0, max_length={max_length}], got {min_length}"),
        (repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {repetition_penalty}"),
        (
            method != "greedy" or num_captions == 1,
            f"greedy decoding gives one caption per image; use num_captions=1 or method='nucleus' (got {num_captions})",
        ),
        (
            method != "beam" or num_beams >= num_captions,
            f"beam search returns at most num_beams captions: need num_beams >= num_captions, got {num_beams} < "
            f"{num_captions}",
        ),
    ]
    for ok, message in problems:
        if not ok:
            raise ValueError(message)
