"""Run statistics: counted per output unit while its rows are committed (into its marker), summed over units
for the whole job (``sculpt report``).

Every statistic is a sum — counts, histograms as lists or keyed counts, busy seconds — so units merge by
adding, in any order, and a rerun that adds units never has to reread the rows of the others.
"""

from __future__ import annotations

import re

import pyarrow as pa

from sculpt import schema
from sculpt.annotation import verify

IOU_BINS = 10  # [0, 0.1), [0.1, 0.2), ..., [0.9, 1.0]
NO_WORK_SECONDS = 1e-4  # a stage busy less than this per image had nothing to do on them (no rate is shown)


def empty() -> dict:
    return {
        "rows": 0,  # one per input image, plus one per shard unreadable as a whole
        "images": 0,  # rows of an image (a tar member): the "images" of status, report and the run summary
        "errors": 0,  # rows with status error
        "empty": 0,  # rows processed without objects
        "objects": 0,
        "verified": 0,  # objects with an IoU
        "kept": 0,  # objects that passed the filter
        "object_errors": 0,
        "errors_by_stage": {},
        "error_kinds": {},  # "<stage>: <what>" -> count, row and object errors
        "objects_per_image": {},  # "n" -> images with n objects (rows not in error)
        "iou_histogram": [0] * IOU_BINS,
        "expression_words": {},  # "n" -> expressions of n words
        "pairs_by_category": {},  # category -> verified pairs (negatives included)
        "kept_by_category": {},  # category -> of those, kept
        # category -> {reject_reason -> pairs}: the keep rule's funnel, each pair counted at the first check it failed
        "rejected_by_category": {},
        "group_sizes": {},  # "n" -> multi-object groups of n members
        "reasoning_pairs": 0,  # reasoning references (style reasoning) the verifier judged
        "reasoning_kept": 0,  # of those, kept
        "chat_turns": 0,  # grounded chat turns stored (the chat stage)
        "stage_seconds": {},  # stage -> busy seconds of its actors
        "stage_images": {},  # stage -> images it processed
    }


def error_kind(message: str) -> str:
    """'read: ./sa_2.json cut off: unexpected end' -> 'read: … cut off': the stage and the first clause, with
    file names and numbers blanked, so that the same failure on different images counts as one kind."""
    stage, _, text = message.partition(": ")
    clause = re.split(r" \(|: | '| \"", text, maxsplit=1)[0]
    words = ["…" if re.search(r"[\d/]|\.\w", w) else w for w in clause.split()]
    return f"{stage}: {' '.join(words)}".strip()


def _add(counter: dict, key, n: int = 1) -> None:
    counter[str(key)] = counter.get(str(key), 0) + n


def count(table: pa.Table) -> dict:
    """Statistics of a batch of pipeline rows (transient columns still present)."""
    stats = empty()
    statuses = table["status"].to_pylist()
    stats["rows"] = table.num_rows
    stats["images"] = sum(1 for key in table["image_key"].to_pylist() if key)
    stats["errors"] = statuses.count(schema.ERROR)
    for row_error, status, objects in zip(table["error"].to_pylist(), statuses, table["objects"].to_pylist()):
        objects = objects or []
        if row_error:
            _add(stats["errors_by_stage"], row_error.split(":", 1)[0])
            _add(stats["error_kinds"], error_kind(row_error))
        if status == schema.ERROR:
            continue  # not data: the objects that stages before the failing one found count for nothing
        _add(stats["objects_per_image"], len(objects))
        stats["empty"] += not objects
        for obj in objects:
            stats["objects"] += 1
            if obj.get("error"):
                stats["object_errors"] += 1
                _add(stats["error_kinds"], error_kind(obj["error"]))
            if obj.get("members"):
                _add(stats["group_sizes"], len(obj["members"]))
            category = obj.get("category") or "unknown"
            if obj.get("reject_reason"):
                _add(stats["rejected_by_category"].setdefault(category, {}), obj["reject_reason"])
            if obj.get("kept") is not None and obj.get("verifier_area") is not None:  # judged by the verifier
                _add(stats["pairs_by_category"], category)
                _add(stats["kept_by_category"], category, int(bool(obj["kept"])))
                if obj.get("style") == verify.REASONING:
                    stats["reasoning_pairs"] += 1
                    stats["reasoning_kept"] += bool(obj["kept"])
            if obj.get("iou") is not None:
                stats["verified"] += 1
                stats["kept"] += bool(obj.get("kept"))
                stats["iou_histogram"][min(IOU_BINS - 1, int(obj["iou"] * IOU_BINS))] += 1
            if obj.get("expression"):
                _add(stats["expression_words"], obj.get("expression_words") or len(obj["expression"].split()))
    if "chat" in table.column_names:
        stats["chat_turns"] = sum(len(turns or []) for turns in table["chat"].to_pylist())
    for timings in table["stage_seconds"].to_pylist():
        for timing in timings or []:
            stats["stage_seconds"][timing["stage"]] = stats["stage_seconds"].get(timing["stage"], 0.0) + timing["seconds"]
            _add(stats["stage_images"], timing["stage"])
    return stats


def merge(total: dict, part: dict) -> dict:
    """Add ``part`` into ``total`` (numbers add, keyed counts add per key, histograms add per bin)."""
    for key, value in part.items():
        if isinstance(value, dict):
            merge(total.setdefault(key, {}), value)
        elif isinstance(value, list):
            current = total.setdefault(key, [0] * len(value))
            total[key] = [a + b for a, b in zip(current, value)]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value
    return total


def derived(stats: dict) -> dict:
    """The ratios a person reads: objects per image, keep rate, words per expression, per-stage speed."""
    images_with_rows = sum(stats["objects_per_image"].values())
    words = stats["expression_words"]
    expressions = sum(words.values())
    return {
        "objects_per_image": stats["objects"] / images_with_rows if images_with_rows else 0.0,
        "keep_rate": stats["kept"] / stats["verified"] if stats["verified"] else None,
        "keep_rate_by_category": {category: stats.get("kept_by_category", {}).get(category, 0) / pairs
                                  for category, pairs in stats.get("pairs_by_category", {}).items() if pairs},
        "funnel": funnel(stats)["all"],
        "reasoning_pairs": stats.get("reasoning_pairs", 0), "reasoning_kept": stats.get("reasoning_kept", 0),
        "chat_turns": stats.get("chat_turns", 0),
        "words_per_expression": sum(int(n) * c for n, c in words.items()) / expressions if expressions else None,
        "error_rate": stats["errors"] / stats["rows"] if stats["rows"] else 0.0,
        "stage_images_per_second": {  # per actor: images over its busy seconds; only stages that did work
            stage: stats["stage_images"][stage] / seconds for stage, seconds in stats["stage_seconds"].items()
            if seconds >= NO_WORK_SECONDS * stats["stage_images"][stage]
        },
    }


def ordered(counts: dict) -> dict:
    """reject_reason -> pairs, in the keep rule's order (a reason this sculpt does not know goes last)."""
    rank = {reason: i for i, reason in enumerate(verify.REASONS)}
    return dict(sorted(counts.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def funnel(stats: dict) -> dict:
    """The keep rule's funnel: category -> {"removed": {reject_reason: pairs, in the rule's order}, "kept": pairs};
    "all" sums the categories. Every judged pair is kept or removed by exactly one check."""
    removed, kept = stats.get("rejected_by_category", {}), stats.get("kept_by_category", {})
    out = {category: {"removed": ordered(removed.get(category, {})), "kept": kept.get(category, 0)}
           for category in sorted(set(removed) | set(kept))}
    every: dict = {}
    for counts in removed.values():
        merge(every, counts)
    out["all"] = {"removed": ordered(every), "kept": sum(kept.values())}
    return out


def funnel_line(job: dict) -> str | None:
    """The funnel of a job's derived statistics (``derived(...)["funnel"]``) in one line; None when no pair was judged.

    >>> funnel_line({"funnel": {"removed": {"duplicate_expression": 3, "low_iou": 5}, "kept": 2}})
    '[sculpt] keep rule: 10 pairs, 2 kept; removed by duplicate_expression 3, low_iou 5'
    """
    step = job.get("funnel") or {}
    removed, kept = step.get("removed") or {}, step.get("kept", 0)
    if not removed and not kept:
        return None
    steps = ", ".join(f"{reason} {n}" for reason, n in removed.items()) or "none"
    return f"[sculpt] keep rule: {kept + sum(removed.values())} pairs, {kept} kept; removed by {steps}"
