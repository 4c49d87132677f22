import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.world.grammar import (
    BARE_TEMPLATES,
    FULL_TEMPLATES,
    NOISE_TYPES,
    Mention,
    ParsedCaption,
    Scene,
    SceneObject,
    attribute_accuracy,
    boilerplate_caption,
    describe,
    other_image_caption,
    paraphrases,
    parse_caption,
    partial_caption,
    relation_holds,
    sample_scene,
    web_caption,
    wrong_attribute_caption,
)

seeds = st.integers(min_value=0, max_value=2**32 - 1)
RED_CIRCLE_LEFT = SceneObject("circle", "red", "large", "left")
BLUE_SQUARE_RIGHT = SceneObject("square", "blue", "small", "right")
TWO = Scene((RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT))


def _as_mention(obj: SceneObject) -> Mention:
    return Mention(obj.shape, obj.color, obj.size, obj.position)


def _is_incomplete(parsed: ParsedCaption, scene: Scene) -> bool:
    return len(parsed.mentions) < len(scene.objects) or any(m.color is None or m.size is None for m in parsed.mentions)


def test_parses_a_relation_caption_exactly() -> None:
    parsed = parse_caption("a large red circle to the left of a small blue square")
    assert parsed == ParsedCaption(
        (Mention("circle", "red", "large"), Mention("square", "blue", "small")), ((0, "left_of", 1),)
    )
    assert parsed.n_attributes == 7


def test_position_before_its_object_and_synonyms() -> None:
    parsed = parse_caption("On the left, a big red circle; in the middle, a little blue square.")
    assert parsed.mentions == (Mention("circle", "red", "large", "left"), Mention("square", "blue", "small", "center"))


def test_unparseable_text_is_none_and_scores_zero() -> None:
    for text in ("", "IMG_0042.jpg", "click to buy", "stock photo 12345", "on the left, something red"):
        assert parse_caption(text) is None
        assert attribute_accuracy(text, TWO) == 0.0


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a large red circle to the left of a small blue square", 1.0),
        ("a picture of a red circle", 1.0),  # the captioner's prompt is ignored
        ("a red circle on the right", 2 / 3),  # shape, color true; position false
        ("a small blue square to the left of a large red circle", 6 / 7),  # only the relation is false
        ("a green star", 0.0),
        ("a red circle, a blue square and a green star", 4 / 6),  # the third object is not in the scene
        ("a blue circle and a red square", 2 / 4),  # best matching: the shapes right, colors wrong
    ],
)
def test_attribute_accuracy_counts_true_claims(caption: str, expected: float) -> None:
    assert attribute_accuracy(caption, TWO) == pytest.approx(expected)


def test_relations_follow_position_anchors() -> None:
    top = SceneObject("star", "green", "small", "top")
    assert relation_holds(RED_CIRCLE_LEFT, "left_of", BLUE_SQUARE_RIGHT)
    assert not relation_holds(RED_CIRCLE_LEFT, "above", BLUE_SQUARE_RIGHT)
    assert relation_holds(top, "above", RED_CIRCLE_LEFT) and relation_holds(RED_CIRCLE_LEFT, "left_of", top)


@settings(max_examples=200, deadline=None)
@given(seeds)
def test_every_full_template_round_trips(seed: int) -> None:
    rng = random.Random(seed)
    scene = sample_scene(rng)
    for template in FULL_TEMPLATES[len(scene.objects)]:
        caption = describe(scene, rng, template)
        parsed = parse_caption(caption)
        assert attribute_accuracy(caption, scene) == 1.0, caption
        assert sorted(m.shape for m in parsed.mentions) == sorted(o.shape for o in scene.objects)
        if "{r" not in template:  # positions stated directly: the parse recovers every object exactly
            assert set(parsed.mentions) == {_as_mention(o) for o in scene.objects}, caption
        else:
            assert len(parsed.relations) == 1, caption


@settings(max_examples=200, deadline=None)
@given(seeds)
def test_noise_generators_behave_as_labelled(seed: int) -> None:
    rng = random.Random(seed)
    scene = sample_scene(rng)
    others = [sample_scene(rng) for _ in range(20)]

    partial = partial_caption(scene, rng)
    assert attribute_accuracy(partial, scene) == 1.0 and _is_incomplete(parse_caption(partial), scene), partial

    wrong = wrong_attribute_caption(scene, rng)
    assert parse_caption(wrong) is not None and attribute_accuracy(wrong, scene) < 1.0, wrong

    borrowed = other_image_caption(scene, others + [scene], rng)
    assert parse_caption(borrowed) is not None and attribute_accuracy(borrowed, scene) < 1.0, borrowed

    assert parse_caption(boilerplate_caption(rng)) is None


def test_wrong_attribute_changes_one_object_by_one_or_two_attributes() -> None:
    changed = []
    for seed in range(300):
        rng = random.Random(seed)
        scene = sample_scene(rng)
        caption = wrong_attribute_caption(scene, rng)
        parsed = parse_caption(caption)
        if not parsed.relations:  # every attribute stated: count the wrong ones exactly
            wrong = len(scene.objects) * 4 - round(attribute_accuracy(caption, scene) * parsed.n_attributes)
            changed.append(wrong)
    assert set(changed) == {1, 2}


def test_other_image_refuses_when_no_candidate_is_false() -> None:
    scene = Scene((RED_CIRCLE_LEFT,))
    with pytest.raises(ValueError, match="n_web"):
        other_image_caption(scene, [scene, scene], random.Random(0))


def test_paraphrases_use_distinct_templates() -> None:
    scene = sample_scene(random.Random(1))
    captions = paraphrases(scene, random.Random(2), 5)
    assert len(captions) == 5 and len(set(captions)) == 5
    assert all(attribute_accuracy(c, scene) == 1.0 for c in captions)


def test_web_caption_dispatches_every_noise_type_and_refuses_others() -> None:
    rng = random.Random(0)
    scene = sample_scene(rng)
    others = [sample_scene(rng) for _ in range(10)]
    captions = {noise_type: web_caption(noise_type, scene, others, rng) for noise_type in NOISE_TYPES}
    assert attribute_accuracy(captions["clean"], scene) == 1.0
    assert captions["empty"] == "" and parse_caption(captions["boilerplate"]) is None
    with pytest.raises(ValueError, match="unknown noise type 'typo'"):
        web_caption("typo", scene, others, rng)


def test_scenes_are_valid_and_json_round_trips() -> None:
    counts = {1: 0, 2: 0, 3: 0}
    for seed in range(300):
        scene = sample_scene(random.Random(seed))
        counts[len(scene.objects)] += 1
        assert len({o.position for o in scene.objects}) == len(scene.objects)
        assert len({(o.color, o.shape) for o in scene.objects}) == len(scene.objects)
        assert Scene.from_json(scene.to_json()) == scene
    assert all(count > 50 for count in counts.values())


def test_templates_exist_for_every_object_count() -> None:
    assert set(FULL_TEMPLATES) == set(BARE_TEMPLATES) == {1, 2, 3}
    assert all(len(templates) >= 5 for templates in FULL_TEMPLATES.values())
