"""Pure evaluation metrics: retrieval recall@k (with BLIP's ITM re-rank), caption BLEU-4 / CIDEr,
attribute accuracy on the synthetic world, and filter precision/recall per noise type.

Nothing here loads a model or reads a file; `pipelines.stages.evaluate` feeds these functions.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from pipelines.registry import OUTRANKED, OUTRANKED_REASONS
from pipelines.world.generate import web_key
from pipelines.world.grammar import NOISY_TYPES, Scene, attribute_accuracy

RECALL_KS = (1, 5, 10)

# --------------------------------------------------------------------------- retrieval


def top_k_candidates(similarity: np.ndarray, k: int) -> np.ndarray:
    """(Q, C) query × candidate similarities -> (Q, min(k, C)) candidate indices, best first
    (ties keep the lower index first)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    order = np.argsort(-similarity, axis=1, kind="stable")
    return order[:, :k]


def top_k_pairs(similarity: np.ndarray, k: int) -> list[list[int]]:
    """For each image (row of `similarity` (N, T)), the sorted texts in its ITC top k or whose top k
    (over images) contains it: every pair a BLIP re-rank in either direction needs, each once."""
    pairs = [set(texts) for texts in top_k_candidates(similarity, k).tolist()]
    for text, images in enumerate(top_k_candidates(similarity.T, k).tolist()):
        for image in images:
            pairs[image].add(text)
    return [sorted(texts) for texts in pairs]


def reranked_scores(similarity: np.ndarray, itm: np.ndarray, k: int) -> np.ndarray:
    """BLIP's retrieval scores: the k best candidates of each query by ITC `similarity` (Q, C) are
    re-scored as ITM + ITC; every other candidate gets -inf, so it ranks below them.

    `itm` (Q, C) holds ITM match scores; only the entries of each query's top k are read (others may
    be NaN). BLIP adds the raw ITM "match" logit; we add the ITM match probability, which is what the
    filter stores too.
    """
    if similarity.shape != itm.shape:
        raise ValueError(f"similarity {similarity.shape} and itm {itm.shape} must have the same shape")
    candidates = top_k_candidates(similarity, k)
    rows = np.arange(len(similarity))[:, None]
    picked = itm[rows, candidates] + similarity[rows, candidates]
    if np.isnan(picked).any():
        raise ValueError("itm has NaN at a query's top-k candidate; score every top-k pair before re-ranking")
    scores = np.full(similarity.shape, -np.inf, dtype=np.float64)
    scores[rows, candidates] = picked
    return scores


def first_relevant_rank(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(Q,) 0-based rank of the best-ranked relevant candidate of each query, for (Q, C) scores and
    (Q, C) boolean relevance. Ties rank the lower candidate index first."""
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} must have the same shape")
    if not relevant.any(axis=1).all():
        raise ValueError("every query needs at least one relevant candidate")
    order = np.argsort(-scores, axis=1, kind="stable")
    relevant_in_order = np.take_along_axis(relevant, order, axis=1)
    return relevant_in_order.argmax(axis=1)


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, ks: Iterable[int] = RECALL_KS) -> dict[int, float]:
    """Fraction of queries with a relevant candidate among their k best, for each k in `ks`."""
    ranks = first_relevant_rank(scores, relevant)
    return {k: float((ranks < k).mean()) for k in ks}


def retrieval_recalls(
    image_text_scores: np.ndarray,
    text_image_scores: np.ndarray,
    text_image: Sequence[int],
    ks: Iterable[int] = RECALL_KS,
) -> dict[str, float]:
    """Text retrieval (image queries, (N, T) scores) and image retrieval (text queries, (T, N) scores).

    `text_image[t]` is the image of text t. An image query is right when any of its texts is retrieved,
    a text query when its image is. Returns {"tr@k": ..., "ir@k": ...} for each k.
    """
    n_images, n_texts = image_text_scores.shape
    if text_image_scores.shape != (n_texts, n_images) or len(text_image) != n_texts:
        raise ValueError(
            f"expected image→text scores (N, T), text→image scores (T, N) and T image indices; got "
            f"{image_text_scores.shape}, {text_image_scores.shape} and {len(text_image)}"
        )
    image_of_text = np.asarray(text_image)
    relevant = image_of_text[None, :] == np.arange(n_images)[:, None]  # (N, T)
    text_recall = recall_at_k(image_text_scores, relevant, ks)
    image_recall = recall_at_k(text_image_scores, relevant.T, ks)
    return {**{f"tr@{k}": v for k, v in text_recall.items()}, **{f"ir@{k}": v for k, v in image_recall.items()}}


# --------------------------------------------------------------------------- captions

_PUNCTUATION = re.compile(r"[^\w\s]")


def simple_tokenize(caption: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed. Stands in for the COCO PTB tokenizer,
    which needs Java; scores are therefore close to, not identical with, official COCO numbers."""
    return " ".join(_PUNCTUATION.sub(" ", caption.lower()).split())


def caption_scores(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D (pycocoevalcap) of one candidate caption per image against its references.

    CIDEr weighs n-grams by their rarity across the references, so it needs several images to mean much.
    """
    if set(references) != set(candidates) or not references:
        missing = sorted(set(references) ^ set(candidates))[:5]
        raise ValueError(
            f"references and candidates must cover the same, non-empty set of images (they differ at {missing})"
        )
    empty = [key for key, texts in references.items() if not texts]
    if empty:
        raise ValueError(f"images without reference captions: {empty[:5]}")
    gts = {key: [simple_tokenize(text) for text in texts] for key, texts in references.items()}
    res = {key: [simple_tokenize(candidates[key])] for key in references}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu_4": float(bleu[3]), "cider": float(cider)}


def attribute_accuracy_summary(captions: Mapping[str, str], scenes: Mapping[str, Scene]) -> dict[str, float | int]:
    """Mean attribute accuracy (`world.grammar.attribute_accuracy`) of captions against their true scenes,
    and the fraction of captions whose every claim is true."""
    missing = sorted(set(captions) - set(scenes))
    if missing:
        raise ValueError(f"no ground-truth scene for {len(missing)} caption(s), e.g. {missing[:3]}")
    tally = AccuracyTally()
    for key, caption in captions.items():
        tally.add(caption, scenes[key])
    return tally.summary()


class AccuracyTally:
    """`attribute_accuracy_summary` accumulated one caption at a time."""

    def __init__(self) -> None:
        self.n, self.total, self.fully_correct = 0, 0.0, 0

    def add(self, caption: str, scene: Scene) -> None:
        accuracy = attribute_accuracy(caption, scene)
        self.n += 1
        self.total += accuracy
        self.fully_correct += accuracy == 1.0

    def summary(self) -> dict[str, float | int | None]:
        if not self.n:
            return {"n": 0, "mean": None, "fully_correct": None}
        return {"n": self.n, "mean": self.total / self.n, "fully_correct": self.fully_correct / self.n}


# --------------------------------------------------------------------------- filtering against the truth


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def removal_metrics(removed: Mapping[tuple[str, bool], int], noisy_types: Iterable[str]) -> dict[str, object]:
    """How well a filter removed the pairs it should, from the number of web pairs per (noise type, removed).

    precision = removed ∧ noisy / removed, recall = removed ∧ noisy / noisy (None when the denominator is
    0), and per noise type the number of pairs, of removed pairs and the removal rate.
    """
    noisy = set(noisy_types)
    totals, removed_by_type = Counter(), Counter()
    for (noise_type, was_removed), n in removed.items():
        totals[noise_type] += n
        removed_by_type[noise_type] += n if was_removed else 0
    n_removed = removed_by_type.total()
    both = sum(n for noise_type, n in removed_by_type.items() if noise_type in noisy)
    return {
        "pairs": totals.total(),
        "removed": n_removed,
        "precision": _ratio(both, n_removed),
        "recall": _ratio(both, sum(n for noise_type, n in totals.items() if noise_type in noisy)),
        "by_noise_type": {
            t: {"pairs": totals[t], "removed": removed_by_type[t], "removal_rate": removed_by_type[t] / totals[t]}
            for t in sorted(totals)
            if totals[t]
        },
    }


WEB_DECISION_COLUMNS = ("url", "caption_source", "kept", "reject_stage", "reject_reason")


def web_decisions(rows: pa.Table, noise_by_key: Mapping[str, str]) -> Counter[tuple[str, str]]:
    """The number of web pairs among `rows` (WEB_DECISION_COLUMNS at least) per (true noise type, decision);
    a decision is "kept", "outranked" (passed the filter, but another caption of its image was kept
    instead) or the reject stage. Raises when a web URL is not a pair of the world."""
    web = rows.filter(pc.equal(rows["caption_source"], "web")).select(list(WEB_DECISION_COLUMNS)).to_pylist()
    unknown = [row["url"] for row in web if web_key(row["url"] or "") not in noise_by_key]
    if unknown:
        raise ValueError(
            f"{len(unknown)} web row(s) have URLs that are not pairs of the given world "
            f"(e.g. {unknown[0]}); pass the world the generation was downloaded from"
        )
    return Counter((noise_by_key[web_key(row["url"])], _decision(row)) for row in web)


def _decision(row: Mapping[str, object]) -> str:
    if row["kept"]:
        return "kept"
    return OUTRANKED if row["reject_reason"] in OUTRANKED_REASONS else str(row["reject_stage"])


def decision_metrics(
    decisions: Mapping[tuple[str, str], int], filter_stage: str, unscreened: Iterable[str]
) -> dict[str, object]:
    """The filter's and all stages' removal metrics and the noise type × decision table, from the number
    of web pairs per (noise type, decision; see `web_decisions`). The filter's count the pairs it judged
    noisy, not those it outranked (all stages' do). Pairs decided at an `unscreened` stage (e.g. a failed
    download) never met the filter: they count in the decision table only."""
    skip = set(unscreened)
    screened = {(n, d): count for (n, d), count in decisions.items() if d not in skip}

    def removed_by(is_removed: Callable[[str], bool]) -> Counter[tuple[str, bool]]:
        counts: Counter[tuple[str, bool]] = Counter()
        for (noise_type, decision), count in screened.items():
            counts[(noise_type, is_removed(decision))] += count
        return counts

    return {
        "filter": removal_metrics(removed_by(lambda d: d == filter_stage), NOISY_TYPES),
        "all_stages": removal_metrics(removed_by(lambda d: d != "kept"), NOISY_TYPES),
        "decisions": confusion_table(decisions),
    }


def confusion_table(decisions: Mapping[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """{noise type: {decision: count}} from counts per (noise type, decision)."""
    table: dict[str, Counter] = {}
    for (noise_type, decision), count in decisions.items():
        table.setdefault(noise_type, Counter())[decision] += count
    return {t: dict(sorted(table[t].items())) for t in sorted(table)}
