"""The kind of a grounded phrase, in GSEval's classes: 1 stuff, 2 part, 3 multi-object, 4 single object.

A rule on the phrase's words and on how many boxes it was grounded to, no model: the head noun is the last word
before the first relation word ("of", "on", "next to" ...); a phrase is

- a **part** when its head is a part noun ("handle", "wheel", "ear" ...), or says "X of the Y" / "the Y's X" with X a
  noun that is a part in such a phrase ("the door of the car", "the bottle's cap");
- **stuff** when its head is an amorphous region ("sky", "grass", "water", "wall" ...);
- **multi-object** when it was grounded to more than one box, or its head is plural or quantified ("two dogs",
  "a group of people", "both cups");
- a **single object** otherwise.

Checked against a hand-labelled golden set (``tests/test_categories.py``); the agreement is in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import re

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


def category(phrase: str, boxes: int = 1) -> int:
    """GSEval class id of a phrase grounded to ``boxes`` boxes."""
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
