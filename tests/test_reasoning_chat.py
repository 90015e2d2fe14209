"""Reasoning references (issue 30, part 1): the prompt, the answer's checks, which objects are asked about, the refer
stage's second round (a stand-in VLM), and the keep rule's verdict on them. Fast: no models, no Ray."""

import numpy as np
import pyarrow as pa
import pytest

from sculpt import schema
from sculpt.annotation import prompts, reasoning, rle, verify
from sculpt.outputs import preview, report, stats

H, W = 20, 40
PARAMS = {"threshold": 0.5, "reasoning_threshold": 0.5, "margin": 0.1, "listener_threshold": 0.5,
          "negative_area": 0.01, "min_words": 3, "max_words": 40, "duplicate_similarity": 1.0}


def box_mask(x0, y0, x1, y1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return rle.encode(m)


def thing(box, phrase, expression, **fields):
    mask = box_mask(*box)
    return schema.new_object(phrase=phrase, box=[float(v) for v in box], mask=mask, area=rle.area(mask),
                             expression=expression, expression_words=len(expression.split()), category="single",
                             style="plain", **fields)


def test_the_reasoning_prompt_puts_the_image_and_caption_first_like_the_refer_prompt():
    text = prompts.reasoning_prompt("A cat.", "a gray cat", (0, 0, 20, 10), W, H)
    assert text == (
        "Image description: A cat.\n\n"
        "Reasoning task: without naming it, write one expression of about 12 words that identifies "
        "<ref>a gray cat</ref><box>[[0, 0, 500, 500]]</box> only by what it is for, how it is used or what one knows "
        "about it, like \"the fruit rich in antioxidants\". Do not mention its colour, material, shape, size, the box "
        "or coordinates. Answer with the expression only.")
    shared = "Image description: A cat.\n\n"  # the prefix every request about the image shares after the image
    assert prompts.refer_prompt("A cat.", "a gray cat", (0, 0, 20, 10), W, H).startswith(shared)
    group = prompts.reasoning_prompt(None, None, (0, 0, 40, 20), W, H, member_boxes=[(0, 0, 20, 10), (20, 10, 40, 20)])
    assert "<ref>the object</ref><box>[[0, 0, 500, 500], [500, 500, 1000, 1000]]</box>" in group
    assert group.startswith("Image description: (none)\n\n")


def test_a_reasoning_answer_may_not_say_how_its_object_looks_nor_name_it():
    assert reasoning.clean_reasoning('Expression: "the animal that purrs and chases mice."', "a gray cat") == \
        "the animal that purrs and chases mice"
    for text in ("the gray animal that purrs", "the cat people feed", "the furry pet", "the cats' favourite bed"):
        with pytest.raises(ValueError):
            reasoning.clean_reasoning(text, "a gray cat")
    with pytest.raises(ValueError, match="plant"):  # its head noun, singular or plural
        reasoning.clean_reasoning("the plant people water", "two green plants")
    with pytest.raises(ValueError):
        reasoning.clean_reasoning("ok", "a cup")  # too short to be an expression
    assert {"plant", "green", "red", "wooden"} <= reasoning.forbidden("two green plants")
    from sculpt.testing import kit

    assert reasoning.clean_reasoning(kit.REASONING, "two green plants") == kit.REASONING


def test_the_objects_asked_about_are_the_largest_whose_plain_pair_passes_the_text_checks():
    objects = [thing((0, 0, 10, 10), "a cup", "the cup on the left"),
               thing((10, 0, 40, 20), "a table", "the table under the cups"),
               thing((0, 10, 5, 20), "a cup", "the cup on the left"),  # a duplicate of the first: neither asked
               thing((20, 0, 30, 5), "a lamp", "a lamp"),  # repeats its phrase
               thing((5, 10, 8, 12), "a pen", "the small pen by the cup"),
               schema.new_object(expression="a yellow umbrella", category="negative", mask=rle.empty(H, W), area=0)]
    assert reasoning.candidates(objects, 2) == [1, 4]
    assert reasoning.candidates(objects, 1) == [1] and reasoning.candidates(objects, 0) == []
    fields = reasoning.reasoning_fields(objects, 1, "what people eat their meals at")
    assert fields == {"phrase": "a table", "box": objects[1]["box"], "mask": objects[1]["mask"],
                      "area": objects[1]["area"], "mask_score": None, "category": "single", "instances": None,
                      "expression": "what people eat their meals at", "expression_words": 6, "style": "reasoning",
                      "target": 1}
    objects.append(schema.new_object(**fields))
    assert reasoning.candidates(objects, 5) == [1, 4]  # a reasoning pair is never asked about itself


class StandInVLM:
    """The refer stage with its engine pool replaced: answers by the prompt's kind."""

    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def __call__(self, encoded, requests, max_tokens):
        self.asked += [text for _, text in requests]
        out = []
        for _, text in requests:
            kind = "reasoning" if text.startswith("Image description") and "Reasoning task" in text else \
                "negative" if "NOT in" in text else "refer"
            out.append({"text": self.answers[kind].pop(0) if isinstance(self.answers[kind], list)
                        else self.answers[kind], "finish_reason": "stop"})
        return out


def test_the_refer_stage_appends_reasoning_pairs_after_the_plain_ones():
    from actors.refer import Referrer

    objects = [schema.new_object(phrase=p, box=[float(v) for v in b], mask=box_mask(*b), area=rle.area(box_mask(*b)),
                                 category="single")
               for p, b in (("a red cup", (0, 0, 10, 10)), ("a table", (10, 0, 40, 20)), ("a pen", (0, 10, 2, 12)))]
    row = schema.new_row("u", 0, "k", width=W, height=H, caption="A red cup on a table.", objects=objects,
                         image_bytes=b"jpeg")
    stage = Referrer(reasoning=1)
    stage.ask = StandInVLM({"refer": ["the red cup on the table", "the table under the cup", "the pen"],
                            "negative": "a blue bird", "reasoning": "what people eat their meals at"})
    stage.process([row])
    got = [(o["expression"], o["style"], o["target"], o["category"]) for o in row["objects"]]
    assert got == [("the red cup on the table", "plain", None, "single"), ("the table under the cup", "plain", None, "single"),
                   ("the pen", "plain", None, "single"), ("a blue bird", "plain", None, "negative"),
                   ("what people eat their meals at", "reasoning", 1, "single")]
    assert row["objects"][4]["mask"] == row["objects"][1]["mask"] and row["objects"][4]["phrase_start"] is None
    assert sum("Reasoning task" in text for text in stage.ask.asked) == 1  # the largest passing object only
    # an answer that says how it looks is dropped: the object keeps its plain pair only
    row2 = schema.new_row("u", 1, "k2", width=W, height=H, caption="A red cup.", objects=[
        schema.new_object(phrase="a red cup", box=[0.0, 0.0, 10.0, 10.0], mask=box_mask(0, 0, 10, 10), area=100,
                          category="single")], image_bytes=b"jpeg")
    stage = Referrer(reasoning=2, negatives=0)
    stage.ask = StandInVLM({"refer": "the red cup on the left", "reasoning": "the red thing people drink from"})
    stage.process([row2])
    assert [o["style"] for o in row2["objects"]] == ["plain"]
    off = Referrer(reasoning=0, negatives=0)
    off.ask = StandInVLM({"refer": "the red cup on the left"})
    row3 = schema.new_row("u", 2, "k3", width=W, height=H, caption="A red cup.", objects=[
        schema.new_object(phrase="a red cup", box=[0.0, 0.0, 10.0, 10.0], mask=box_mask(0, 0, 10, 10), area=100,
                          category="single")], image_bytes=b"jpeg")
    off.process([row3])
    assert len(row3["objects"]) == 1 and not any("Reasoning task" in t for t in off.ask.asked)


def judged(objects, masks, params=PARAMS):
    for i, mask in enumerate(masks):
        if mask is not None:
            verify.judge(objects, i, mask, params)
    return [(o["kept"], o["reject_reason"]) for o in objects]


def test_a_reasoning_pair_is_judged_by_the_same_rule_and_kept_only_with_its_target():
    cup, table = thing((0, 0, 10, 10), "a cup", "the cup on the left"), thing((20, 0, 40, 20), "a table", "the table on the right")
    copy = schema.new_object(**reasoning.reasoning_fields([cup, table], 0, "what people drink coffee from"))
    objects = [cup, table, copy]
    assert verify.related(objects, 2) == {0, 2} and verify.related(objects, 0) == {0, 2}
    # the verifier draws the cup for both: its own copy is no rival (same mask), the table is
    assert judged(objects, [cup["mask"], table["mask"], cup["mask"]]) == [(True, None), (True, None), (True, None)]
    assert objects[2]["iou"] == 1.0 and objects[2]["rival_iou"] == 0.0
    # its target rejected: the reasoning pair too, though it fits, by the rule's last check
    objects = [dict(cup, expression="the cup"), table, dict(copy)]  # "the cup": too short
    assert judged(objects, [cup["mask"], table["mask"], cup["mask"]]) == \
        [(False, "too_short"), (True, None), (False, "unkept_target")]
    assert verify.REASONS[-1] == "unkept_target"
    # its own threshold: a reasoning pair at IoU 0.4 passes at 0.3, a plain one does not
    half = box_mask(0, 0, 10, 4)
    objects = [thing((0, 0, 10, 10), "a cup", "the cup on the left"), dict(copy)]
    assert judged(objects, [half, half], {**PARAMS, "reasoning_threshold": 0.3}) == \
        [(False, "low_iou"), (False, "unkept_target")]
    objects = [thing((0, 0, 10, 10), "a cup", "the cup on the left"), dict(copy)]
    assert judged(objects, [cup["mask"], half], {**PARAMS, "reasoning_threshold": 0.3}) == [(True, None), (True, None)]
    assert judged([objects[0], dict(copy)], [cup["mask"], half]) == [(True, None), (False, "low_iou")]


def test_the_verify_stage_takes_and_checks_its_reasoning_threshold():
    from actors.verify import Verifier

    assert Verifier(model="x/y").params["reasoning_threshold"] == 0.5
    assert Verifier(model="x/y", reasoning_threshold=0.3).params["reasoning_threshold"] == 0.3
    with pytest.raises(ValueError, match="reasoning_threshold"):
        Verifier(model="x/y", reasoning_threshold=2)


def test_reasoning_pairs_are_counted_by_stats_report_and_preview():
    cup = thing((0, 0, 10, 10), "a cup", "the cup on the left", kept=True, iou=0.9, verifier_area=100)
    copy = {**schema.new_object(**reasoning.reasoning_fields([cup], 0, "what people drink coffee from")),
            "kept": False, "iou": 0.3, "verifier_area": 30, "reject_reason": "low_iou"}
    rows = [schema.new_row("u", 0, "k", objects=[cup, copy])]
    counted = stats.count(schema.to_table(rows))
    assert (counted["reasoning_pairs"], counted["reasoning_kept"]) == (1, 0)
    assert counted["pairs_by_category"] == {"single": 2}  # beside its category
    total = stats.merge(stats.empty(), counted)
    assert ("reasoning pairs kept", "0 of 1", "pairs (0.0%; in the categories above)") in report.kind_figures(total)
    card = preview.card_html({**rows[0], "width": W, "height": H, "caption": "A cup."}, None)
    assert 'data-reasoning="1">1 reasoning reference(s), 0 kept' in card and "reasoning, names #0" in card


def test_older_outputs_without_style_and_target_read_as_plain_ones():
    """Schema version 4 objects (no style, no target): read back, counted and judged as before (the fields null)."""
    old_object = pa.struct([f for f in schema.OBJECT_TYPE if f.name not in ("style", "target")])
    cup = thing((0, 0, 10, 10), "a cup", "the cup on the left", kept=True, iou=0.9, verifier_area=100)
    old = {k: v for k, v in cup.items() if k not in ("style", "target")}
    table = pa.Table.from_pylist([{"objects": [old]}], schema=pa.schema([("objects", pa.list_(old_object))]))
    [row] = table.to_pylist()
    assert row["objects"][0].get("style") is None and row["objects"][0].get("target") is None
    assert verify.related(row["objects"], 0) == {0}
    assert reasoning.candidates(row["objects"], 1) == [0]


# --- grounded chat (issue 30, part 2) --------------------------------------------------------------------------------

def test_the_chat_prompt_lists_the_objects_after_the_image_and_caption():
    from sculpt.annotation import chat

    text = prompts.chat_prompt("A cat.", [("a gray cat", [(0, 0, 20, 10)]), (None, [(0, 0, 20, 10), (20, 10, 40, 20)])],
                               2, W, H)
    assert text == (
        "Image description: A cat.\n\n"
        "Chat task. The objects of the image:\n"
        "1. <ref>a gray cat</ref><box>[[0, 0, 500, 500]]</box>\n"
        "2. <ref>the object</ref><box>[[0, 0, 500, 500], [500, 500, 1000, 1000]]</box>\n"
        "Write 2 question and answer pair(s) that a person could ask about this image and answer from it. In each "
        "answer, mark every listed object it mentions as <ref>its words</ref>[n], n being its number in the list. "
        "Write each pair as two lines, \"Q: question\" and \"A: answer\".")
    assert chat.DEFAULT_TURNS == 2


def test_chat_answers_map_each_mark_to_its_listed_object_and_drop_turns_naming_none():
    from sculpt.annotation import chat

    answer = ("Q: What do people water <ref>here</ref>[1]?\n"
              "A: They water <ref>the two plants</ref>[1] beside <ref>the window</ref> [2, 9] and <ref>it</ref>[7].\n"
              "Q: Where is the cat?\nA: **On** the <ref>red sofa</ref>[3],\nnear <ref>the lamp</ref>[5].\n"
              "Q: Anything else?\nA: Nothing <box>[[1, 2, 3, 4]]</box> else.\n"
              "Q: And?\nA: The <ref>cup</ref>[4] again.")
    turns = chat.parse_turns(answer, [4, 5, 6], 5)
    assert turns == [
        {"question": "What do people water here?", "answer": "They water the two plants beside the window and it.",
         "spans": [{"start": 11, "end": 25, "objects": [4]}, {"start": 33, "end": 43, "objects": [5]}]},
        {"question": "Where is the cat?", "answer": "On the red sofa, near the lamp.",
         "spans": [{"start": 7, "end": 15, "objects": [6]}]}]
    for turn in turns:
        assert all(turn["answer"][s["start"]:s["end"]] in ("the two plants", "the window", "red sofa")
                   for s in turn["spans"])
    assert chat.parse_turns(answer, [4, 5, 6], 1) == turns[:1]
    assert chat.parse_turns("no turns here", [4], 2) == [] and chat.parse_turns(answer, [], 2) == []
    from sculpt.testing import kit

    [turn] = chat.parse_turns(kit.CHAT, [3], 2)
    assert turn["answer"][turn["spans"][0]["start"]:turn["spans"][0]["end"]] == "the plants"


def test_the_chat_lists_kept_objects_only():
    from sculpt.annotation import chat

    kept = dict(kept=True)
    objects = [thing((0, 0, 10, 10), "a cup", "the cup on the left", **kept),
               thing((10, 0, 40, 20), "a table", "the table under it", kept=False),
               schema.new_object(expression="a bird", category="negative", mask=rle.empty(H, W), area=0, kept=True),
               thing((0, 10, 5, 20), "a pen", "the pen below the cup", **kept, error="verify: x")]
    objects.append({**schema.new_object(**reasoning.reasoning_fields(objects, 0, "what people drink from")), **kept})
    objects.append(thing((20, 0, 30, 10), "a lamp", "the lamp on the table", **kept))
    assert chat.listed(objects) == [0, 5]


def test_the_chat_stage_stores_the_turns_of_images_with_kept_objects():
    from actors.chat import Chatter

    objects = [thing((0, 0, 10, 10), "a cup", "the cup on the left", kept=True),
               thing((10, 0, 40, 20), "a table", "the table under it", kept=False)]
    rows = [schema.new_row("u", 0, "a", width=W, height=H, caption="A cup.", objects=objects, image_bytes=b"jpeg"),
            schema.new_row("u", 1, "b", width=W, height=H, caption="A table.", objects=[objects[1]], image_bytes=b"j"),
            schema.new_row("u", 2, "c", width=W, height=H, caption="A cup.", objects=objects, image_bytes=b"jpeg")]
    asked = []

    def ask(encoded, requests, max_tokens):
        asked.extend(requests)
        return [{"text": "Q: What is it?\nA: It is <ref>a cup</ref>[1].", "finish_reason": "stop"},
                {"text": "Q: What is it?\nA: It is <ref>a table</ref>[2].", "finish_reason": "stop"}]

    stage = Chatter(turns=1)
    stage.ask = ask
    stage.process(rows)
    assert [key for key, _ in asked] == ["u/0", "u/2"]  # the image without a kept object is not asked
    assert "1. <ref>a cup</ref><box>[[0, 0, 250, 500]]</box>\n" in asked[0][1] and "a table" not in asked[0][1]
    assert rows[0]["chat"] == [{"question": "What is it?", "answer": "It is a cup.",
                                "spans": [{"start": 6, "end": 11, "objects": [0]}]}]
    assert rows[1]["chat"] is None and rows[2]["chat"] == []  # mark 2 names no listed object: the turn is dropped
    table = schema.to_table(rows)  # the column's type holds them
    assert table["chat"].to_pylist()[0] == rows[0]["chat"]
