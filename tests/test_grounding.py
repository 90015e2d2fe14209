"""Golden tests of sculpt.annotation.grounding: caption splitting, phrase spans and filtering, box cleaning. No model."""

import pytest

from sculpt.annotation import grounding
from sculpt.annotation.grounding import Chunk

CAPTION = (
    "A gray tabby cat lies on a wooden table. Next to it stands a white coffee cup with a spoon. "
    "Behind the table, a window shows green trees and a blue sky! The image is bright."
)


def words(text):  # a stand-in tokenizer: one token per word
    return len(text.split())


def test_sentences_keep_their_offsets():
    spans = grounding.sentence_spans(CAPTION)
    assert [CAPTION[a:b] for a, b in spans] == [
        "A gray tabby cat lies on a wooden table.",
        "Next to it stands a white coffee cup with a spoon.",
        "Behind the table, a window shows green trees and a blue sky!",
        "The image is bright.",
    ]
    text = "One\n\ntwo three. Four"
    assert [text[a:b] for a, b in grounding.sentence_spans(text)] == ["One", "two three.", "Four"]


def test_short_caption_is_one_chunk():
    assert grounding.split_caption(CAPTION, 100, words) == [Chunk(0, len(CAPTION), CAPTION)]


def test_split_packs_whole_sentences_within_budget():
    chunks = grounding.split_caption(CAPTION, 22, words)
    assert [c.text for c in chunks] == [
        "A gray tabby cat lies on a wooden table. Next to it stands a white coffee cup with a spoon.",
        "Behind the table, a window shows green trees and a blue sky! The image is bright.",
    ]
    for c in chunks:
        assert CAPTION[c.start:c.end] == c.text and words(c.text) <= 22


def test_every_phrase_survives_splitting_with_its_span():
    phrases = ["gray tabby cat", "wooden table", "white coffee cup", "spoon", "window", "green trees", "blue sky"]
    for budget in (4, 7, 12, 22, 1000):
        chunks = grounding.split_caption(CAPTION, budget, words)
        assert all(words(c.text) <= budget for c in chunks)
        # nothing lost or reordered: the chunks cover the caption's words in order
        assert " ".join(c.text for c in chunks).split() == CAPTION.split()
        if budget >= 12:  # every sentence fits: cuts fall between sentences only
            for phrase in phrases:
                holding = [c for c in chunks if phrase in c.text]
                assert holding, (budget, phrase)
                start = holding[0].start + holding[0].text.index(phrase)
                assert CAPTION[start:start + len(phrase)] == phrase


def test_long_sentence_is_cut_between_words_and_an_overlong_word_is_refused():
    chunks = grounding.split_caption("one two three four five. six", 2, words)
    assert [c.text for c in chunks] == ["one two", "three four", "five. six"]
    with pytest.raises(ValueError, match="alone exceeds"):
        grounding.split_caption("a supercalifragilistic word", 3, len)


def test_generic_phrases():
    for phrase in ["it", "They", "the image", "The Image", "this image", "an image", "", "  ", "...", "the", "itself"]:
        assert grounding.is_generic(phrase), phrase
    for phrase in ["cat", "the cat", "a wooden table", "the image frame on the wall", "itinerary board"]:
        assert not grounding.is_generic(phrase), phrase


def test_find_span_is_case_space_and_ascii_tolerant():
    caption = "A Café  Table and a cat. The cat sleeps."
    assert grounding.find_span(caption, "caf table") == (2, 13)  # Florence-2 drops non-ASCII letters
    assert caption[2:13] == "Café  Table"
    assert grounding.find_span(caption, "the CAT") == (25, 32)
    assert grounding.find_span(caption, "cat", after=21) == (29, 32)  # the next occurrence after the cursor
    assert grounding.find_span(caption, "cat", after=35) == (20, 23)  # else the first one
    assert grounding.find_span(caption, "cat", start=24) == (29, 32)
    assert grounding.find_span(caption, "dog") is None and grounding.find_span(caption, "") is None


def test_chunk_objects_spans_filters_and_clipping():
    caption = "Intro sentence here. A red car beside it and the image of a tree."
    chunk = grounding.split_caption(caption, 12, words)[1]
    assert chunk.text == "A red car beside it and the image of a tree."
    labels = ["red car", "red car", "it", "the image", "a tree", "loc_12>", "a tree"]
    boxes = [[10, 20, 110, 80], [-5, 30, 700, 90], [0, 0, 5, 5], [0, 0, 640, 480], [300, 40, 300, 200],
             [1, 1, 50, 50], [200, 10, 260, 470]]
    objects = grounding.chunk_objects(caption, chunk, labels, boxes, width=640, height=480)
    assert objects == [
        {"phrase": "red car", "phrase_start": 23, "phrase_end": 30, "box": [10.0, 20.0, 110.0, 80.0]},
        {"phrase": "red car", "phrase_start": 23, "phrase_end": 30, "box": [0.0, 30.0, 640.0, 90.0]},
        {"phrase": "a tree", "phrase_start": 58, "phrase_end": 64, "box": [200.0, 10.0, 260.0, 470.0]},
    ]
    for obj in objects:
        assert caption[obj["phrase_start"]:obj["phrase_end"]] == obj["phrase"]


def test_box_helpers():
    assert grounding.clip_box([-3, 5, 900, 700], 800, 600) == [0.0, 5.0, 800.0, 600.0]
    assert grounding.is_degenerate([5, 5, 5.5, 50]) and grounding.is_degenerate([9, 5, 5, 50])
    assert not grounding.is_degenerate([5, 5, 6, 6])
    assert grounding.box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    objects = [{"box": [0, 0, 100, 100]}, {"box": [1, 1, 100, 100]}, {"box": [50, 0, 150, 100]}]
    assert grounding.drop_duplicates(objects) == [objects[0], objects[2]]
    assert grounding.drop_duplicates(objects, iou=0.99) == objects
