"""The synthetic world's language: scenes, the caption grammar that describes them, and its parser.

A scene is 1-3 objects, each with a shape, a color, a size and one of five positions. Captions come from
a small grammar with several paraphrase templates ("a large red circle to the left of a small blue
square"). `parse_caption` reads any caption back into the objects it mentions, so that
`attribute_accuracy` can measure how true a caption (human, web or model-generated) is of a scene.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import asdict, dataclass, replace

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("left_of", "right_of", "above", "below")

# Kinds of web alt-text. `partial` is true but weak, so it is neither clean nor noisy.
NOISE_TYPES = ("clean", "partial", "wrong_attribute", "other_image", "boilerplate", "empty")
NOISY_TYPES = frozenset({"wrong_attribute", "other_image", "boilerplate", "empty"})

# Where each position lies, as (x, y) fractions of the image side; relations are read from these.
POSITION_ANCHORS = {
    "left": (0.18, 0.5),
    "right": (0.82, 0.5),
    "top": (0.5, 0.18),
    "bottom": (0.5, 0.82),
    "center": (0.5, 0.5),
}
OBJECT_COUNT_WEIGHTS = {1: 0.3, 2: 0.4, 3: 0.3}

# Words the grammar writes, and the parser reads back (every phrase maps to exactly one value).
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
RELATION_PHRASES = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}

# Paraphrase templates per object count. {o0} is an object's noun phrase, {p0} its position phrase,
# {r01} a true relation from object 0 to object 1. FULL templates state every attribute of every
# object (position directly or through a relation); BARE ones leave positions out (for partial captions).
FULL_TEMPLATES = {
    1: (
        "{o0} {p0}",
        "there is {o0} {p0}",
        "{o0} is {p0}",
        "{p0}, {o0}",
        "{p0} there is {o0}",
        "{o0} {p0} of the picture",
    ),
    2: (
        "{o0} {p0} and {o1} {p1}",
        "{o0} {r01} {o1}",
        "there is {o0} {r01} {o1}",
        "{o0} is {r01} {o1}",
        "{o0} is {p0} and {o1} is {p1}",
        "{p0}, {o0}, and {p1}, {o1}",
        "two shapes: {o0} {p0} and {o1} {p1}",
    ),
    3: (
        "{o0} {p0}, {o1} {p1} and {o2} {p2}",
        "{o0} {r01} {o1}, and {o2} {p2}",
        "there are three shapes: {o0} {p0}, {o1} {p1} and {o2} {p2}",
        "{o0} is {p0}, {o1} is {p1} and {o2} is {p2}",
        "{p0}, {o0}; {p1}, {o1}; {p2}, {o2}",
        "{o2} {p2}, and {o0} {r01} {o1}",
    ),
}
BARE_TEMPLATES = {
    1: ("{o0}", "there is {o0}", "a picture of {o0}"),
    2: ("{o0} and {o1}", "there is {o0} and {o1}"),
    3: ("{o0}, {o1} and {o2}",),
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """The truth about one image: its objects (distinct positions, distinct (color, shape) pairs)."""

    objects: tuple[SceneObject, ...]

    def to_json(self) -> str:
        return json.dumps({"objects": [asdict(o) for o in self.objects]}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Scene:
        return cls(tuple(SceneObject(**o) for o in json.loads(text)["objects"]))


@dataclass(frozen=True)
class Mention:
    """One object as a caption describes it; attributes the caption leaves out are None."""

    shape: str
    color: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class ParsedCaption:
    mentions: tuple[Mention, ...]
    relations: tuple[tuple[int, str, int], ...]  # (subject mention index, relation, object mention index)

    @property
    def n_attributes(self) -> int:
        """How many attribute claims the caption makes: shapes, given colors/sizes/positions, relations."""
        given = sum(1 + sum(v is not None for v in (m.color, m.size, m.position)) for m in self.mentions)
        return given + len(self.relations)


def sample_scene(rng: random.Random) -> Scene:
    """A random scene of 1-3 objects at distinct positions with distinct (color, shape) pairs."""
    n_objects = rng.choices(list(OBJECT_COUNT_WEIGHTS), weights=list(OBJECT_COUNT_WEIGHTS.values()))[0]
    positions = rng.sample(POSITIONS, n_objects)
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n_objects)
    return Scene(
        tuple(
            SceneObject(shape, color, rng.choice(SIZES), position) for (color, shape), position in zip(kinds, positions)
        )
    )


def relation_holds(subject: SceneObject, relation: str, reference: SceneObject) -> bool:
    """Whether `subject` is `relation` (left_of, right_of, above, below) `reference`, by position anchors."""
    (sx, sy), (rx, ry) = POSITION_ANCHORS[subject.position], POSITION_ANCHORS[reference.position]
    return {"left_of": sx < rx, "right_of": sx > rx, "above": sy < ry, "below": sy > ry}[relation]


# --- writing captions ---------------------------------------------------------------------------


def describe(scene: Scene, rng: random.Random, template: str | None = None, absolute_positions: bool = False) -> str:
    """A full, true caption of `scene`: every object with shape, color, size and position (or a relation).

    `template` picks one of FULL_TEMPLATES (random when None); `absolute_positions` restricts the random
    choice to templates that name every object's position rather than a relation.
    """
    n = len(scene.objects)
    if template is None:
        choices = [t for t in FULL_TEMPLATES[n] if not (absolute_positions and "{r" in t)]
        template = rng.choice(choices)
    objects = rng.sample(scene.objects, n)
    return _render(template, objects, [(True, True)] * n, rng)


def paraphrases(scene: Scene, rng: random.Random, count: int) -> list[str]:
    """`count` full captions of `scene`, each from a different template while templates last (COCO style)."""
    templates = rng.sample(FULL_TEMPLATES[len(scene.objects)], len(FULL_TEMPLATES[len(scene.objects)]))
    return [describe(scene, rng, templates[i % len(templates)]) for i in range(count)]


def partial_caption(scene: Scene, rng: random.Random) -> str:
    """A true but incomplete caption: it leaves out at least one object, or a size or color of one."""
    n_kept = rng.randint(1, len(scene.objects))
    objects = rng.sample(scene.objects, n_kept)
    keep = [(rng.random() < 0.5, rng.random() < 0.5) for _ in objects]  # (size, color) per object
    if n_kept == len(scene.objects) and all(size and color for size, color in keep):
        dropped = rng.randrange(n_kept)
        keep[dropped] = rng.choice([(False, True), (True, False)])
    template = rng.choice(FULL_TEMPLATES[n_kept] + BARE_TEMPLATES[n_kept])
    return _render(template, objects, keep, rng)


def wrong_attribute_caption(scene: Scene, rng: random.Random) -> str:
    """A full caption of `scene` with 1 or 2 attributes of one object changed to another value.

    Only one object changes, and (color, shape) pairs and positions are unique in a scene, so no other
    matching of mentions to objects can make the caption true: its attribute_accuracy is always < 1.
    """
    index = rng.randrange(len(scene.objects))
    target = scene.objects[index]
    changes: dict[str, str] = {}
    for attribute in rng.sample(("shape", "color", "size", "position"), rng.choice((1, 1, 2))):
        if attribute == "position":
            taken = {o.position for o in scene.objects}
            changes["position"] = rng.choice([p for p in POSITIONS if p not in taken])
        else:
            values = {"shape": SHAPES, "color": COLORS, "size": SIZES}[attribute]
            changes[attribute] = rng.choice([v for v in values if v != getattr(target, attribute)])
    objects = list(scene.objects)
    objects[index] = replace(target, **changes)
    # A moved object might still satisfy a relation, so a changed position is always stated directly.
    return describe(Scene(tuple(objects)), rng, absolute_positions="position" in changes)


def other_image_caption(scene: Scene, candidates: list[Scene], rng: random.Random) -> str:
    """A full caption of a random scene among `candidates` that is not entirely true of `scene`."""
    start = rng.randrange(len(candidates))
    for offset in range(len(candidates)):
        caption = describe(candidates[(start + offset) % len(candidates)], rng)
        if attribute_accuracy(caption, scene) < 1.0:
            return caption
    raise ValueError("every candidate scene's caption is also true of this scene; make more web pairs (n_web)")


def web_caption(noise_type: str, scene: Scene, candidates: list[Scene], rng: random.Random) -> str:
    """The alt-text of a web image with truth `scene` under `noise_type` (one of NOISE_TYPES).

    `candidates` are the scenes an `other_image` caption may be borrowed from.
    """
    if noise_type == "clean":
        return describe(scene, rng)
    if noise_type == "partial":
        return partial_caption(scene, rng)
    if noise_type == "wrong_attribute":
        return wrong_attribute_caption(scene, rng)
    if noise_type == "other_image":
        return other_image_caption(scene, candidates, rng)
    if noise_type == "boilerplate":
        return boilerplate_caption(rng)
    if noise_type == "empty":
        return ""
    raise ValueError(f"unknown noise type {noise_type!r}; expected one of {', '.join(NOISE_TYPES)}")


BOILERPLATE_TEMPLATES = (
    "IMG_{n4}.jpg",
    "DSC{n5}.JPG",
    "click to buy",
    "stock photo",
    "stock photo {n5}",
    "free shipping on all orders",
    "image may contain: text",
    "untitled",
    "photo {n3}",
    "download high resolution",
    "buy now and save {n2}%",
    "thumbnail",
    "screenshot_{n4}.png",
    "product image",
)


def boilerplate_caption(rng: random.Random) -> str:
    """Web alt-text that says nothing about the image ("IMG_0042.jpg", "click to buy", ...)."""
    numbers = {f"n{k}": f"{rng.randrange(10**k):0{k}d}" for k in (2, 3, 4, 5)}
    return rng.choice(BOILERPLATE_TEMPLATES).format(**numbers)


def _render(template: str, objects: list[SceneObject], keep: list[tuple[bool, bool]], rng: random.Random) -> str:
    """Fill `template` for `objects` (in that order); keep[i] = (say the size, say the color) of object i."""
    fields = {}
    for i, (obj, (say_size, say_color)) in enumerate(zip(objects, keep)):
        words = [rng.choice(SIZE_WORDS[obj.size])] if say_size else []
        words += [obj.color] if say_color else []
        words.append(obj.shape)
        article = "an" if words[0][0] in "aeiou" else "a"
        fields[f"o{i}"] = f"{article} {' '.join(words)}"
        fields[f"p{i}"] = rng.choice(POSITION_PHRASES[obj.position])
    if len(objects) >= 2:
        true_relations = [r for r in RELATIONS if relation_holds(objects[0], r, objects[1])]
        fields["r01"] = RELATION_PHRASES[rng.choice(true_relations)]
    return template.format(**fields)


# --- reading captions ---------------------------------------------------------------------------

_WORD_TO_SIZE = {word: size for size, words in SIZE_WORDS.items() for word in words}
_WORD_TO_POSITION = {
    "left": "left",
    "right": "right",
    "top": "top",
    "bottom": "bottom",
    "center": "center",
    "centre": "center",
    "middle": "center",
}
_RELATION_NGRAMS = {tuple(phrase.split()): relation for relation, phrase in RELATION_PHRASES.items()}
_CLAUSE_BREAKS = {",", ";", ":", ".", "and", "while"}
_TOKEN = re.compile(r"[a-z]+|[,;:.]")


def parse_caption(text: str) -> ParsedCaption | None:
    """The objects and relations a caption mentions, or None when it mentions no shape.

    Reading rules (they cover every caption the grammar writes, and degrade gracefully on others):
    a shape word closes an object mention and takes the size and color words since the last clause
    break (`,` `;` `:` `.` "and"); a position phrase describes the latest object of its clause, or
    the next object when its clause has none yet (a second position for one object is ignored); a
    relation phrase links the object before it to the object after it. Unknown words are skipped.
    """
    tokens = _TOKEN.findall(text.lower())
    mentions: list[Mention] = []
    relations: list[tuple[int, str, int]] = []
    pending: dict[str, str] = {}
    pending_position: str | None = None
    open_relation: tuple[int, str] | None = None
    clause_start = 0
    i = 0
    while i < len(tokens):
        relation, length = _relation_at(tokens, i)
        token = tokens[i]
        i += length
        if relation:
            open_relation = (len(mentions) - 1, relation) if mentions else None
        elif token in _CLAUSE_BREAKS:
            clause_start, pending = len(mentions), {}
        elif token in _WORD_TO_POSITION:
            if len(mentions) > clause_start and mentions[-1].position is None:
                mentions[-1] = replace(mentions[-1], position=_WORD_TO_POSITION[token])
            elif len(mentions) == clause_start:
                pending_position = _WORD_TO_POSITION[token]
        elif token in _WORD_TO_SIZE:
            pending["size"] = _WORD_TO_SIZE[token]
        elif token in COLORS:
            pending["color"] = token
        elif token in SHAPES:
            mentions.append(Mention(token, position=pending_position, **pending))
            pending, pending_position = {}, None
            if open_relation:
                relations.append((open_relation[0], open_relation[1], len(mentions) - 1))
                open_relation = None
    return ParsedCaption(tuple(mentions), tuple(relations)) if mentions else None


def _relation_at(tokens: list[str], i: int) -> tuple[str | None, int]:
    """The relation phrase starting at tokens[i] (if any) and how many tokens it spans (at least 1)."""
    for length in sorted({len(ngram) for ngram in _RELATION_NGRAMS}, reverse=True):
        relation = _RELATION_NGRAMS.get(tuple(tokens[i : i + length]))
        if relation:
            return relation, length
    return None, 1


def attribute_accuracy(caption: str, scene: Scene) -> float:
    """The fraction of the attribute claims in `caption` that are true of `scene`; 0.0 if it makes none.

    Claims (see `ParsedCaption.n_attributes`): each mentioned object's shape, and its size, color and
    position when given; each relation between two mentioned objects. Mentions are matched one-to-one to
    scene objects by the matching that makes the most claims true; a mention left without an object
    (the caption names more objects than the scene has) has all its claims false, as has any relation
    touching it. Unparseable captions (no shape word: boilerplate, empty) score 0.0.
    """
    parsed = parse_caption(caption)
    if parsed is None:
        return 0.0
    best = max(
        _true_claims(parsed, scene, matching) for matching in _matchings(len(parsed.mentions), len(scene.objects))
    )
    return best / parsed.n_attributes


def _matchings(n_mentions: int, n_objects: int):
    """Every one-to-one matching of mentions to scene objects, as a tuple of object index (or None) per mention."""
    if n_mentions <= n_objects:
        yield from itertools.permutations(range(n_objects), n_mentions)
        return
    for chosen in itertools.permutations(range(n_mentions), n_objects):  # chosen[k]: the mention of object k
        matching: list[int | None] = [None] * n_mentions
        for obj, mention in enumerate(chosen):
            matching[mention] = obj
        yield tuple(matching)


def _true_claims(parsed: ParsedCaption, scene: Scene, matching: tuple[int | None, ...]) -> int:
    true = 0
    for mention, obj_index in zip(parsed.mentions, matching):
        if obj_index is None:
            continue
        obj = scene.objects[obj_index]
        true += mention.shape == obj.shape
        true += sum(
            getattr(mention, a) == getattr(obj, a)
            for a in ("color", "size", "position")
            if getattr(mention, a) is not None
        )
    for subject, relation, reference in parsed.relations:
        a, b = matching[subject], matching[reference]
        true += a is not None and b is not None and relation_holds(scene.objects[a], relation, scene.objects[b])
    return true
