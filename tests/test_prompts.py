import os

import pytest

from sculpt.annotation import prompts


def test_box_to_text_scales_each_axis_by_its_own_size():
    # landscape 600x400 and portrait 400x600: the same pixel box lands on different 0..1000 coordinates
    assert prompts.box_to_text((60, 40, 300, 400), 600, 400) == "[[100, 100, 500, 1000]]"
    assert prompts.box_to_text((60, 40, 300, 400), 400, 600) == "[[150, 67, 750, 667]]"
    assert prompts.box_to_text((-5, 0, 700, 399.4), 600, 400) == "[[0, 0, 1000, 998]]"  # clamped


def test_refer_prompt_golden():
    text = prompts.refer_prompt("A cat on a sofa.", "the cat", (0, 0, 226, 150), 451, 300)
    assert text == (
        "Image description: A cat on a sofa.\n\n"
        "Write one referring expression of about 16 words for <ref>the cat</ref><box>[[0, 0, 501, 500]]</box>. "
        "Use its distinctive attributes and its position relative to other objects, so that it cannot be mistaken "
        "for anything else in the image. Do not mention the box or coordinates. Answer with the expression only."
    )


def test_refer_prompts_of_one_image_share_the_caption_prefix():
    a = prompts.refer_prompt("Two cats.", "left cat", (0, 0, 10, 10), 100, 100)
    b = prompts.refer_prompt("Two cats.", "right cat", (50, 0, 60, 10), 100, 100)
    assert os.path.commonprefix([a, b]).startswith("Image description: Two cats.\n\n")


@pytest.mark.parametrize(
    "raw, truncated, expected",
    [
        ("  A dog runs.\n\nIt is **brown**.<|im_end|>", False, "A dog runs. It is brown."),
        ("- a red car\n- a tree", False, "a red car a tree"),
        ("A dog runs on grass. The sky is bl", True, "A dog runs on grass."),
        ("no sentence end at all", True, "no sentence end at all"),
        ("", False, ""),
        ("a\x08 cat\ufffd sits", False, "a cat sits"),  # control bytes and broken UTF-8 from partial tokens
    ],
)
def test_clean_caption(raw, truncated, expected):
    assert prompts.clean_caption(raw, truncated) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ('"the brown dog lying left of the red sofa."', "the brown dog lying left of the red sofa"),
        ("Referring expression: the tallest tree behind the house. It is green.", "the tallest tree behind the house"),
        ("Answer - “small white cup on the table”", "small white cup on the table"),
        ("the man in a blue shirt\nsecond line ignored", "the man in a blue shirt"),
        ("<ref>the cat</ref> sleeping on the left cushion<|im_end|>", "the cat sleeping on the left cushion"),
    ],
)
def test_clean_expression(raw, expected):
    assert prompts.clean_expression(raw) == expected


@pytest.mark.parametrize("raw", ["", "   ", "dog", "12 34 !!", "\"\""])
def test_unusable_expressions_raise(raw):
    with pytest.raises(ValueError, match="unusable referring expression"):
        prompts.clean_expression(raw)
