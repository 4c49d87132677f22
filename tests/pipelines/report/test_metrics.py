"""pipelines.report.metrics against values computed by hand."""

from collections import Counter

import numpy as np
import pytest

from pipelines.manifests.manifest import samples_table
from pipelines.report.metrics import (
    attribute_accuracy_summary,
    caption_scores,
    confusion_table,
    decision_metrics,
    first_relevant_rank,
    recall_at_k,
    removal_metrics,
    reranked_scores,
    retrieval_recalls,
    simple_tokenize,
    top_k_candidates,
    top_k_pairs,
    web_decisions,
)
from pipelines.world.generate import web_key
from pipelines.world.grammar import NOISY_TYPES, Scene, SceneObject

# 3 images, 2 texts each: text t belongs to image t // 2.
TEXT_IMAGE = [0, 0, 1, 1, 2, 2]
SIMILARITY = np.array(
    [
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.0],  # image 0: best text 0 (right)
        [0.7, 0.0, 0.1, 0.6, 0.2, 0.3],  # image 1: best text 0 (wrong), then text 3 (right)
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.05],  # image 2: best text 4 (right)
    ]
)
# ITM match probabilities; only the top-2 ITC candidates of each query are read by the re-rank.
ITM = np.array(
    [
        [0.9, 0.0, 0.2, 0.0, 0.0, 0.0],
        [0.1, 0.0, 0.0, 0.9, 0.0, 1.0],  # text 5 has a high ITM but is not in image 1's ITC top 2
        [0.0, 0.0, 0.0, 0.1, 0.8, 0.0],
    ]
)


def test_top_k_candidates_best_first_with_stable_ties() -> None:
    assert top_k_candidates(np.array([[0.1, 0.5, 0.5, 0.9]]), 3).tolist() == [[3, 1, 2]]
    assert top_k_candidates(np.array([[0.1, 0.5]]), 16).tolist() == [[1, 0]]  # k larger than the candidates
    with pytest.raises(ValueError, match="k must be"):
        top_k_candidates(SIMILARITY, 0)


def test_top_k_pairs_join_both_directions_once() -> None:
    # image top 1: t0, t0, t4; text top 1 (columns): t0→0, t1→2, t2→0, t3→1, t4→2, t5→1
    assert top_k_pairs(SIMILARITY, 1) == [[0, 2], [0, 3, 5], [1, 4]]
    assert all(len(texts) == 6 for texts in top_k_pairs(SIMILARITY, 3)), "every text's top 3 has all 3 images"


def test_first_relevant_rank_and_recall() -> None:
    scores = np.array([[0.3, 0.9, 0.5], [0.2, 0.2, 0.1]])
    relevant = np.array([[True, False, False], [False, True, False]])
    assert first_relevant_rank(scores, relevant).tolist() == [2, 1]  # tie: candidate 0 ranks before 1
    assert recall_at_k(scores, relevant, ks=(1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 1.0}
    with pytest.raises(ValueError, match="at least one relevant"):
        recall_at_k(scores, np.zeros_like(relevant))


def test_retrieval_recalls_from_itc_alone() -> None:
    recalls = retrieval_recalls(SIMILARITY, SIMILARITY.T, TEXT_IMAGE, ks=(1, 2, 5))
    # Image queries: images 0 and 2 find one of their texts first, image 1 second.
    assert recalls["tr@1"] == pytest.approx(2 / 3) and recalls["tr@2"] == recalls["tr@5"] == 1.0
    # Text queries (columns of SIMILARITY): texts 0, 3, 4 find their image first; t1 [0.1, 0.0, 0.2] finds
    # image 0 second, t5 [0.0, 0.3, 0.05] image 2 second, t2 [0.8, 0.1, 0.3] image 1 last.
    assert recalls["ir@1"] == pytest.approx(3 / 6)
    assert recalls["ir@2"] == pytest.approx(5 / 6)
    assert recalls["ir@5"] == 1.0


def test_itm_rerank_changes_the_answer_within_the_top_k_only() -> None:
    scores = reranked_scores(SIMILARITY, ITM, k=2)
    # image 1: text 0 -> 0.7 + 0.1, text 3 -> 0.6 + 0.9: the right text now comes first.
    assert scores[1, 3] == pytest.approx(1.5) and scores[1, 0] == pytest.approx(0.8)
    assert np.isneginf(scores[1, 5]), "text 5's ITM cannot lift it: it is outside the ITC top 2"
    assert (np.isfinite(scores).sum(axis=1) == 2).all()
    recalls = retrieval_recalls(scores, SIMILARITY.T, TEXT_IMAGE, ks=(1,))
    assert recalls["tr@1"] == 1.0


def test_rerank_refuses_unscored_top_k_pairs() -> None:
    itm = ITM.copy()
    itm[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        reranked_scores(SIMILARITY, itm, k=2)
    itm[1, 1] = np.nan  # outside the top 2: never read
    itm[1, 3] = 0.5
    assert np.isfinite(reranked_scores(SIMILARITY, itm, k=2)).sum() == 6


def test_simple_tokenize() -> None:
    assert simple_tokenize("A Red circle, on the LEFT.") == "a red circle on the left"


def test_caption_scores_identical_high_unrelated_zero() -> None:
    references = {
        "a": ["a red circle on the left", "a big red circle at the left"],
        "b": ["a blue square at the top", "there is a blue square near the top"],
        "c": ["a green star in the middle", "a small green star in the center"],
    }
    identical = caption_scores(
        references,
        {"a": "A red circle on the left.", "b": "a blue square at the top", "c": "a green star in the middle"},
    )
    assert identical["bleu_4"] > 0.99 and identical["cider"] > 3.0
    unrelated = caption_scores(references, {"a": "click to buy", "b": "stock photo", "c": "IMG_0042.jpg"})
    assert unrelated["bleu_4"] < 1e-6 and unrelated["cider"] == 0.0
    with pytest.raises(ValueError, match="same, non-empty set"):
        caption_scores(references, {"a": "a red circle"})


def test_attribute_accuracy_summary() -> None:
    scene = Scene((SceneObject("circle", "red", "large", "left"),))
    summary = attribute_accuracy_summary(
        {"x": "a large red circle on the left", "y": "a large blue circle on the left", "z": "stock photo"},
        {"x": scene, "y": scene, "z": scene},
    )
    # x: 4/4 claims true, y: 3/4 (color wrong), z: no claims -> 0
    assert summary == {"n": 3, "mean": pytest.approx((1 + 0.75 + 0) / 3), "fully_correct": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="no ground-truth scene"):
        attribute_accuracy_summary({"q": "a circle"}, {})


def test_removal_metrics_per_noise_type() -> None:
    noise = ["clean", "clean", "partial", "wrong_attribute", "other_image", "boilerplate", "empty", "empty"]
    removed = [False, True, True, True, False, True, True, True]
    metrics = removal_metrics(Counter(zip(noise, removed)), NOISY_TYPES)
    # removed: 6, of which noisy: wrong_attribute, boilerplate, empty, empty = 4; noisy in all: 5
    assert metrics["removed"] == 6 and metrics["pairs"] == 8
    assert metrics["precision"] == pytest.approx(4 / 6)
    assert metrics["recall"] == pytest.approx(4 / 5)
    assert metrics["by_noise_type"]["clean"] == {"pairs": 2, "removed": 1, "removal_rate": 0.5}
    assert metrics["by_noise_type"]["other_image"]["removal_rate"] == 0.0
    assert metrics["by_noise_type"]["empty"]["removal_rate"] == 1.0
    nothing_removed = removal_metrics(Counter({("clean", False): 1, ("empty", False): 1}), NOISY_TYPES)
    assert nothing_removed["precision"] is None and nothing_removed["recall"] == 0.0


def test_confusion_table() -> None:
    table = confusion_table(Counter(zip(["clean", "clean", "empty", "clean"], ["kept", "rank", "filter", "kept"])))
    assert table == {"clean": {"kept": 2, "rank": 1}, "empty": {"filter": 1}}


def test_captions_the_filter_outranked_are_not_counted_as_its_noise_verdicts() -> None:
    """A clean web caption that passed the filter but lost to the image's synthetic caption (best_per_image)
    is left out by the filter stage, yet not judged noisy: it counts in all stages' removals only."""
    urls = [f"http://127.0.0.1/{n}.png" for n in range(4)]
    rows = samples_table(
        {
            "image_id": ["a", "b", "c", "d", "a"],
            "url": [*urls, urls[0]],
            "caption": ["clean kept", "clean outranked", "noisy removed", "noisy kept", "synthetic"],
            "caption_source": ["web", "web", "web", "web", "synthetic"],
            "generation": [1] * 5,
            "kept": [True, False, False, True, True],
            "reject_stage": [None, "filter", "filter", None, None],
            "reject_reason": [None, "itm_outranked", "itm_below_threshold", None, None],
        }
    )
    noise = {web_key(urls[0]): "clean", web_key(urls[1]): "clean", web_key(urls[2]): "other_image"}
    noise[web_key(urls[3])] = "wrong_attribute"
    decisions = web_decisions(rows, noise)
    assert decisions == Counter({("clean", "kept"): 1, ("clean", "outranked"): 1, ("other_image", "filter"): 1,
                                 ("wrong_attribute", "kept"): 1})  # fmt: skip
    metrics = decision_metrics(decisions, "filter", unscreened=["download"])
    assert (metrics["filter"]["removed"], metrics["filter"]["precision"]) == (1, 1.0)
    assert (metrics["all_stages"]["removed"], metrics["all_stages"]["precision"]) == (2, 0.5)
