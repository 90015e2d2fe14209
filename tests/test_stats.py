import json

import numpy as np
import pytest

from sculpt import cli, schema
from sculpt.outputs import report, stats
from sculpt.annotation import rle
from sculpt.outputs.store import OutputStore
from sculpt.outputs.units import UnitWriter

JOB = {"fingerprint": "f", "settings": {}, "model_ids": {}, "prompts_version": "p1", "total_shards": 1}


def obj(iou=None, expression=None, error=None):
    mask = rle.encode(np.ones((4, 6), bool))
    return {"phrase": "x", "box": [0, 0, 6, 4], "mask": mask, "area": 24, "iou": iou, "kept": None if iou is None else iou >= 0.5,
            "expression": expression, "expression_words": len(expression.split()) if expression else None, "error": error}


def rows():
    a = schema.new_row("u", 0, "sa_1", width=6, height=4,
                       objects=[obj(0.5, "the red cup"), obj(0.49, "a cup on the left"), obj(1.0, "the red cup")])
    b = schema.new_row("u", 1, "sa_2", width=6, height=4, objects=[obj(error="refer: unusable referring expression 'zz'")])
    c = schema.mark_error(schema.new_row("u", 2, "sa_3"), "read", "./sa_3.jpg cut off: unexpected end of data")
    d = schema.new_row("u", 3, "sa_4", width=6, height=4)
    for row in (a, b, d):
        row["stage_seconds"] = [{"stage": "caption", "seconds": 0.5}, {"stage": "verify", "seconds": 0.25}]
    for row in (a, b, c, d):
        row["unit_end"] = {"size": 4, "bytes_read": 100}
    return [a, b, c, d]


def test_count_golden():
    s = stats.count(schema.to_table(rows()))
    assert (s["rows"], s["images"], s["errors"], s["empty"], s["objects"]) == (4, 4, 1, 1, 4)
    assert (s["verified"], s["kept"], s["object_errors"]) == (3, 2, 1)
    assert s["iou_histogram"] == [0, 0, 0, 0, 1, 1, 0, 0, 0, 1]  # 0.49 | 0.5 (a bin edge) | 1.0 in the last bin
    assert s["objects_per_image"] == {"3": 1, "1": 1, "0": 1}  # the error row is not an image with 0 objects
    assert s["expression_words"] == {"3": 2, "5": 1}
    assert s["errors_by_stage"] == {"read": 1}
    assert s["error_kinds"] == {"read: … cut off": 1, "refer: unusable referring expression": 1}
    assert s["stage_seconds"] == {"caption": 1.5, "verify": 0.75} and s["stage_images"] == {"caption": 3, "verify": 3}
    d = stats.derived(s)
    assert d["keep_rate"] == pytest.approx(2 / 3) and d["objects_per_image"] == pytest.approx(4 / 3)
    assert d["words_per_expression"] == pytest.approx(11 / 3) and d["stage_images_per_second"] == {"caption": 2.0, "verify": 4.0}


def test_an_error_rows_objects_count_for_nothing():
    failed = schema.mark_error(schema.new_row("u", 4, "sa_5", width=6, height=4, objects=[obj(1.0, "a cup")] * 6),
                               "refer", "RuntimeError: boom")  # its earlier stages' objects are still on it
    s = stats.count(schema.to_table([*rows(), failed]))
    assert (s["errors"], s["objects"], s["verified"], s["kept"]) == (2, 4, 3, 2)
    assert s["expression_words"] == {"3": 2, "5": 1} and s["iou_histogram"][-1] == 1
    assert stats.derived(s)["objects_per_image"] == 4 / 3  # over the three images that are data


def test_merge_adds_everything():
    one = stats.count(schema.to_table(rows()))
    two = stats.merge(stats.merge(stats.empty(), one), one)
    assert two["rows"] == 8 and two["iou_histogram"][9] == 2 and two["expression_words"]["3"] == 4
    assert two["stage_seconds"]["caption"] == 3.0 and two["error_kinds"]["read: … cut off"] == 2


def judged(category, reason=None, iou=0.9):
    """A pair the verify stage judged: kept, or rejected by ``reason``."""
    return {**obj(iou, "the red cup on the table"), "category": category, "verifier_area": 0,
            "kept": reason is None, "reject_reason": reason}


def funnel_rows():
    a = schema.new_row("u", 0, "sa_1", width=6, height=4, objects=[
        judged("single"), judged("single", "duplicate_expression"), judged("single", "duplicate_expression"),
        judged("single", "low_iou", 0.2), judged("multi", "rival"), judged("multi"),
        judged("negative", "negative_drawn", None), {**judged("single", "no_expression", None), "verifier_area": None},
        judged("stuff", "from_the_future")])  # a reason this sculpt does not know
    failed = schema.mark_error(schema.new_row("u", 1, "sa_2", width=6, height=4,
                                              objects=[judged("single", "too_short")]), "verify", "RuntimeError: x")
    return schema.to_table([a, failed])


def test_the_funnel_counts_each_pair_at_the_first_check_it_failed_per_category():
    s = stats.count(funnel_rows())
    assert s["rejected_by_category"] == {"single": {"duplicate_expression": 2, "low_iou": 1, "no_expression": 1},
                                         "multi": {"rival": 1}, "negative": {"negative_drawn": 1},
                                         "stuff": {"from_the_future": 1}}  # the error row's pair counts for nothing
    steps = stats.funnel(stats.merge(stats.merge(stats.empty(), s), s))  # units add up
    assert list(steps) == ["multi", "negative", "single", "stuff", "all"]
    assert steps["single"] == {"removed": {"no_expression": 2, "duplicate_expression": 4, "low_iou": 2}, "kept": 2}
    assert list(steps["all"]["removed"].items()) == [  # in the rule's order; an unknown reason last
        ("no_expression", 2), ("duplicate_expression", 4), ("low_iou", 2), ("rival", 2), ("negative_drawn", 2),
        ("from_the_future", 2)]
    assert steps["all"]["kept"] == 4
    assert stats.derived(s)["funnel"] == {"removed": stats.funnel(s)["all"]["removed"], "kept": 2}
    assert stats.funnel_line(stats.derived(s)) == (
        "[sculpt] keep rule: 9 pairs, 2 kept; removed by no_expression 1, duplicate_expression 2, low_iou 1, "
        "rival 1, negative_drawn 1, from_the_future 1")
    assert stats.funnel_line(stats.derived(stats.empty())) is None  # nothing judged (a job without verify)
    assert stats.funnel_line({}) is None  # the summary when the statistics could not be read


def test_the_run_summary_prints_the_funnel_in_one_line():
    from sculpt.engine import progress

    summary = {"shards": 1, "committed_now": 1, "images": 1, "errors": 0, "seconds": 1.0, "pending": [],
               "job": progress.rounded(stats.derived(stats.count(funnel_rows())))}
    lines = progress.describe(summary)
    assert [line for line in lines if "keep rule" in line] == [stats.funnel_line(summary["job"])]
    assert not any("keep rule" in line for line in progress.describe({**summary, "job": {}}))


def test_the_run_summary_counts_reasoning_references_and_chat_turns():
    from sculpt.engine import progress

    rows = funnel_rows().to_pylist()
    objects = rows[0]["objects"]
    objects[0] = {**objects[0], "style": "reasoning", "kept": True, "verifier_area": 1}
    rows[0]["chat"] = [{"question": "q", "answer": "a", "spans": []}] * 2
    counted = stats.count(schema.to_table(rows))
    assert (counted["reasoning_pairs"], counted["reasoning_kept"], counted["chat_turns"]) == (1, 1, 2)
    summary = {"shards": 1, "committed_now": 1, "images": 1, "errors": 0, "seconds": 1.0, "pending": [],
               "job": progress.rounded(stats.derived(counted))}
    whole = progress.describe(summary)[1]
    assert "reasoning references kept 1 of 1" in whole and "grounded chat turns 2" in whole
    assert "reasoning" not in progress.describe({**summary, "job": {}})[0]  # none: nothing said


def test_report_shows_the_funnel_per_category(tmp_path, capsys):
    store = OutputStore(str(tmp_path / "out"))
    store.prepare(JOB)
    table = funnel_rows().to_pylist()
    for row in table:
        row["unit_end"] = {"size": 2, "bytes_read": 1}
    writer = UnitWriter(store, "u", JOB)
    writer.add(schema.to_table(table))
    marker = writer.commit()
    assert marker["rejected_by_category"]["single"] == {"duplicate_expression": 2, "low_iou": 1, "no_expression": 1}
    assert cli.main(["report", str(tmp_path / "out"), "--plots", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    funnel = text[text.index("keep rule funnel"):].splitlines()[1:7]
    assert [line.split() for line in funnel] == [
        ["category", "pairs", "no_expression", "duplicate_expression", "low_iou", "rival", "negative_drawn",
         "from_the_future", "kept"],
        ["multi", "2", "0", "0", "0", "1", "0", "0", "1"],
        ["negative", "1", "0", "0", "0", "0", "1", "0", "0"],
        ["single", "5", "1", "2", "1", "0", "0", "0", "1"],
        ["stuff", "1", "0", "0", "0", "0", "0", "1", "0"],
        ["all", "9", "1", "2", "1", "1", "1", "1", "2"]]


@pytest.mark.parametrize("message, kind", [
    ("read: not a readable image (UnidentifiedImageError: x)", "read: not a readable image"),
    ("caption: RuntimeError: CUDA out of memory", "caption: RuntimeError"),
    ("read: shard s3://b/sa_1.tar ends early or is unreadable after 3 images", "read: shard … ends early or is unreadable after … images"),
])
def test_error_kind(message, kind):
    assert stats.error_kind(message) == kind


def test_marker_carries_stats_and_report_prints_and_plots(tmp_path, capsys):
    store = OutputStore(str(tmp_path / "out"))
    store.prepare(JOB)
    writer = UnitWriter(store, "u", JOB)
    writer.add(schema.to_table(rows()))
    marker = writer.commit()
    assert marker["kept"] == 2 and marker["iou_histogram"][9] == 1
    assert json.loads(open(store.marker_uri("u")).read())["stage_images"] == {"caption": 3, "verify": 3}

    assert cli.main(["report", str(tmp_path / "out"), "--plots", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "keep rate 66.7%" in text and "1.33 per image" in text and "3.7 words" in text
    assert "keep rule funnel" not in text  # no pair carries a reject_reason (as in an output written before it)
    assert "stage caption         2.00 img/s per actor" in text and "read: … cut off" in text
    for name in ("iou_histogram", "objects_per_image", "expression_words", "stage_throughput"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_status_and_report_count_images_alike_and_idle_stages_get_no_rate(tmp_path, capsys):
    store = OutputStore(str(tmp_path / "out"))
    store.prepare(JOB)
    table = rows()
    for row in table:  # a stage that had nothing to do on these images (e.g. verify without objects)
        row["stage_seconds"] = (row["stage_seconds"] or []) + [{"stage": "idle", "seconds": 1e-6}]
    writer = UnitWriter(store, "u", JOB)
    writer.add(schema.to_table(table))
    writer.commit()
    unreadable = UnitWriter(store, "v", JOB)  # a shard unreadable as a whole: one row, no image
    row = schema.mark_error(schema.new_row("v", 0, ""), "read", "shard v.tar is unreadable")
    row["unit_end"] = {"size": 1, "bytes_read": 0}
    unreadable.add(schema.to_table([row]))
    unreadable.commit()

    status = cli.status(str(tmp_path / "out"), store.s3)
    assert cli.main(["report", str(tmp_path / "out"), "--plots", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    line = "4 (1 errors; 1 shard(s) unreadable as a whole)"
    assert f"images   {line}" in status and f"images            {line}" in printed
    assert "stage idle        no work on these images" in printed
    rates = stats.derived(report.job_stats(store)[0])["stage_images_per_second"]
    assert "idle" not in rates and "caption" in rates


def test_stage_actors_are_named_after_their_stage():
    from sculpt.stage import Stage, StageActor, actor_class

    class Stub(Stage):
        name = "ground"

    stage = Stub()
    stage.name = "verify-semantic"
    cls = actor_class(stage)
    assert cls.__name__ == "VerifySemanticStage" and issubclass(cls, StageActor)
