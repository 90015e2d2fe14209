"""``sculpt review``: the precision of an output measured with people, through Label Studio.

``sample OUT DEST``: a stratified sample of the output's pairs (``pairs.pairs_of`` with ``keep_all``: kept and
rejected; negatives have no region to judge and are left out) as Label Studio tasks, one task per pair:
``DEST/tasks.json``, ``DEST/labeling-config.xml`` (``LABELING_CONFIG``) and the images under ``DEST/images/``.

- Strata: check × category × IoU band. The check is the object's ``reject_reason`` where the output has one,
  else ``kept`` / ``rejected`` (``unverified`` without a verifier IoU); ``BANDS`` are the IoU bands.
- Allocation: equal per stratum, capped at the stratum's size, what a small stratum cannot use shared among the
  others (``allocate``): a rare stratum gets as many reviews as a common one.
- Within a stratum: the pairs with the smallest ``priority`` (a hash of seed, shard, index, object): a uniform
  random sample that is the same for the same seed whatever the reading order, and a larger ``n`` keeps every pair
  a smaller one drew. Tasks are numbered (``pair``) in priority order, so reviewers see the strata mixed.

Each task's data carries sculpt's ids (``shard``, ``index``, ``object``), the stratum, its size in the output
(``stratum_size``) and its sample size, so that a Label Studio export leads back, and the pair's ``category`` and
``style`` (plain, or reasoning: the expression names the object by what it is for; ``pairs.style_of``), which the
reviewer reads among its facts and the verdicts keep. Its prediction is the pair's mask as one brush region (label
``pair``); the reviewer chooses accept or reject and may write a better expression.

``import_verdicts(OUT, EXPORT.json)``: Label Studio's JSON (or JSON-min) export into ``OUT/.sculpt/review/
verdicts.parquet`` (committed units are never touched); a pair imported again has its verdict replaced. The
latest annotation of a task that is not cancelled and has a verdict counts.

``summarize`` / ``render`` (``sculpt review report``): strata are drawn at different rates, so every verdict is
weighted by ``stratum_size / reviewed pairs of its stratum`` (the verdicts of a stratum stand for all its pairs);
a figure is the weighted share, its 95 % interval Wilson's score interval at Kish's effective sample size
``(Σw)² / Σw²``. Precision: good (accepted) share of kept pairs; recall: kept share of good pairs; per check: the
good share of what each check decided. The IoU threshold for a target precision is searched upward from the
job's own, among kept pairs (the other checks as the job ran them).
"""

from __future__ import annotations

import datetime
import hashlib
import heapq
import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq

from sculpt.annotation import rle
from sculpt.io import storage
from sculpt.io.storage import S3Options
from sculpt.outputs import export
from sculpt.outputs.pairs import ExportError, ShardImages, data_files, iter_rows, pair_record, pairs_of
from sculpt.outputs.store import BOOKKEEPING

BANDS = (0.0, 0.3, 0.5, 0.7, 0.85)  # lower edges of the IoU score bands; the last one reaches 1
LABEL = "pair"  # the one brush label
IMAGES = "images"  # DEST/images: the Local Storage path; DEST is LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
IMAGE_ROOT = f"/data/local-files/?d={IMAGES}"  # how Label Studio serves DEST/images/<shard>/<key>.jpg
VERDICTS = f"{BOOKKEEPING}/review/verdicts.parquet"
Z = 1.959964  # the normal quantile of a two-sided 95 % interval
LABELING_CONFIG = f"""<View>
  <Header value="$title"/>
  <View style="display: flex; align-items: flex-start; gap: 1em">
    <View style="flex: 3">
      <Image name="image" value="$image" zoom="true"/>
      <BrushLabels name="mask" toName="image"><Label value="{LABEL}" background="#ff4500"/></BrushLabels>
    </View>
    <View style="flex: 2">
      <Header value="Expression" size="5"/>
      <Text name="expression" value="$expression"/>
      <Header value="Does the expression name the orange region, all of it and nothing else?" size="5"/>
      <Choices name="verdict" toName="image" choice="single" required="true" showInline="true">
        <Choice value="accept" hotkey="a"/>
        <Choice value="reject" hotkey="r"/>
      </Choices>
      <Header value="A better expression (optional)" size="5"/>
      <TextArea name="fixed" toName="image" rows="2" maxSubmissions="1" editable="true"/>
      <Text name="facts" value="$facts"/>
    </View>
  </View>
</View>
"""

VERDICT_SCHEMA = pa.schema([
    ("shard", pa.string()), ("index", pa.int32()), ("object", pa.int32()), ("image_key", pa.string()),
    ("pair", pa.int32()), ("seed", pa.int64()), ("category", pa.string()), ("style", pa.string()),
    ("check", pa.string()), ("band", pa.string()), ("kept", pa.bool_()), ("iou", pa.float32()),
    ("rival_iou", pa.float32()), ("reject_reason", pa.string()), ("stratum", pa.string()), ("stratum_size", pa.int64()),
    ("stratum_sample", pa.int64()), ("expression", pa.string()),
    ("verdict", pa.string()), ("good", pa.bool_()), ("fixed_expression", pa.string()),  # accept | reject
    ("task", pa.int64()), ("annotation", pa.int64()), ("annotator", pa.string()), ("annotated_at", pa.string()),
    ("imported_at", pa.string()),
])


# -- the sample -------------------------------------------------------------------------------------------------

def band(iou) -> str:
    if iou is None:
        return "none"
    low = max(edge for edge in BANDS if edge <= max(float(iou), 0.0))
    high = next((edge for edge in BANDS if edge > low), 1.0)
    return f"{low:.2f}-{high:.2f}"


def check(obj: dict) -> str:
    if obj.get("reject_reason"):
        return str(obj["reject_reason"])
    return {True: "kept", False: "rejected"}.get(obj.get("kept"), "unverified")


def stratum_of(obj: dict) -> str:
    return f"{check(obj)}|{obj.get('category') or 'none'}|{band(obj.get('iou'))}"


def priority(seed: int, shard: str, index: int, position: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{shard}/{index}/{position}".encode(), digest_size=8).digest(), "big")


def allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Equal allocation capped at each stratum's size, the smallest strata first: sums to min(n, Σ sizes)."""
    take, left = {}, n
    order = sorted(sizes, key=lambda s: (sizes[s], s))
    for i, name in enumerate(order):
        take[name] = min(sizes[name], -(-left // (len(order) - i)))
        left -= take[name]
    return take


def draw(out: str, n: int, seed: int = 0, s3: S3Options = S3Options()) -> tuple[dict, dict, dict]:
    """One pass over OUT: ({(shard, index, object): (priority, stratum)} drawn, stratum sizes, allocation)."""
    sizes: dict[str, int] = {}
    best: dict[str, list] = {}  # per stratum a heap of the n smallest priorities (negated: heapq pops the least)
    for row in iter_rows(out, s3):
        for position, obj in pairs_of(row, keep_all=True):
            name = stratum_of(obj)
            sizes[name] = sizes.get(name, 0) + 1
            item = (-priority(seed, row["shard"], row["index"], position), (row["shard"], row["index"], position))
            heap = best.setdefault(name, [])
            (heapq.heappush if len(heap) < n else heapq.heappushpop)(heap, item)
    take = allocate(sizes, n)
    chosen = {}
    for name, heap in best.items():
        for negated, key in sorted(heap, reverse=True)[:take[name]]:
            chosen[key] = (-negated, name)
    return chosen, sizes, take


def sample(out: str, dest: str, n: int = 300, seed: int = 0, s3: S3Options = S3Options(),
           shards: list[str] | None = None, image_root: str = IMAGE_ROOT, overwrite: bool = False) -> dict:
    """Write DEST/tasks.json, DEST/labeling-config.xml and DEST/images/; returns counts and the strata."""
    if storage.is_s3(dest):
        raise ExportError("the review folder must be local: Label Studio's Local Storage serves it")
    if not data_files(out, s3):
        raise ExportError(f"{out}: no sculpt output here (no committed Parquet files)")
    if os.path.isdir(dest) and os.listdir(dest) and not overwrite:
        raise ExportError(f"{dest} exists; choose another destination or pass --overwrite")
    encode = export.brush_encoder()
    chosen, sizes, take = draw(out, n, seed, s3)
    if not chosen:
        raise ExportError(f"{out}: no pairs to review (no object with a mask and an expression)")
    number = {key: k for k, key in enumerate(sorted(chosen, key=lambda key: chosen[key]), 1)}
    dest = os.path.abspath(dest)
    tasks, counts = [], {"pairs": len(chosen), "strata": len(sizes), "population": sum(sizes.values())}

    def wanted():
        for row in iter_rows(out, s3):
            found = [(p, o) for p, o in pairs_of(row, keep_all=True) if (row["shard"], row["index"], p) in chosen]
            if found:
                yield row, [{**pair_record(row, p, o, image_root), "reject_reason": o.get("reject_reason"),
                             "has_reason": "reject_reason" in o} for p, o in found]

    images = export.extracting_images(wanted(), os.path.join(dest, IMAGES), ShardImages(out, s3, shards), s3, counts)
    for _, records in images:
        for pair in records:
            key = (pair["shard"], pair["index"], pair["object"])
            tasks.append(task(pair, number[key], len(chosen), chosen[key][1], sizes, take, seed, encode))
    tasks.sort(key=lambda t: t["data"]["pair"])
    storage.write_atomic(os.path.join(dest, "tasks.json"), json.dumps(tasks, ensure_ascii=False, indent=1).encode())
    storage.write_atomic(os.path.join(dest, "labeling-config.xml"), LABELING_CONFIG.encode())
    export.tidy_tmp(os.path.join(dest, "tasks.json"), s3)
    counts["take"], counts["sizes"] = take, sizes
    return counts


def _round(x):
    return None if x is None else round(float(x), 6)  # a float32's digits, not its binary noise


def task(pair: dict, number: int, total: int, stratum: str, sizes: dict, take: dict, seed: int, encode) -> dict:
    """One pair as a Label Studio task: its data (ids, stratum, what the reviewer reads) and its mask as a prediction."""
    iou = pair["iou"]
    facts = " · ".join(x for x in (pair["category"], pair["style"], check(pair),
                                   None if iou is None else f"IoU {iou:.2f}",
                                   None if pair["rival_iou"] is None else f"rival {pair['rival_iou']:.2f}",
                                   f"{pair['shard']} #{pair['index']} object {pair['object']}") if x)
    data = {
        "image": pair["image_path"], "title": f"pair {number} of {total}", "expression": pair["expression"],
        "facts": facts, "caption": pair["caption"] or "", "pair": number, "seed": seed,
        "shard": pair["shard"], "index": pair["index"], "object": pair["object"], "image_key": pair["image_key"],
        "category": pair["category"], "style": pair["style"], "check": check(pair), "band": band(iou),
        "kept": pair["kept"],
        "iou": _round(iou), "rival_iou": _round(pair["rival_iou"]),
        "stratum": stratum, "stratum_size": sizes[stratum], "stratum_sample": take[stratum],
    }
    if pair["has_reason"]:
        data["reject_reason"] = pair["reject_reason"]
    region = {"id": f"pair{number}", "from_name": "mask", "to_name": "image", "type": "brushlabels",
              "original_width": pair["width"], "original_height": pair["height"], "image_rotation": 0,
              "value": {"format": "rle", "rle": encode(rle.decode(pair["mask"])), "brushlabels": [LABEL]}}
    return {"data": data, "predictions": [{"model_version": "sculpt", "result": [region]}]}


# -- verdicts ---------------------------------------------------------------------------------------------------

def _annotator(who) -> str | None:
    if isinstance(who, dict):
        return who.get("email") or str(who.get("id"))
    return None if who is None else str(who)


def _latest(annotations: list[dict]) -> dict | None:
    """The task's latest annotation that is not cancelled and has a verdict: {verdict, fixed, ...}."""
    found = None
    for a in annotations:
        if a.get("was_cancelled"):
            continue
        values = {r.get("from_name"): r.get("value") or {} for r in a.get("result") or []}
        choices = (values.get("verdict") or {}).get("choices") or []
        if not choices:
            continue
        text = [t for t in (values.get("fixed") or {}).get("text") or [] if t and t.strip()]
        when = a.get("updated_at") or a.get("created_at") or ""
        if found is None or (when, a.get("id") or 0) >= (found["annotated_at"], found["annotation"] or 0):
            found = {"verdict": choices[0], "fixed_expression": text[-1].strip() if text else None,
                     "annotation": a.get("id"), "annotator": _annotator(a.get("completed_by")), "annotated_at": when}
    return found


def read_export(path: str) -> list[dict]:
    """Verdict rows (VERDICT_SCHEMA) of a Label Studio JSON or JSON-min export of sculpt review tasks."""
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    if not isinstance(items, list):
        raise ExportError(f"{path}: not a Label Studio JSON export (a list of tasks)")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows: dict[tuple, dict] = {}
    for item in items:
        if "annotations" in item or "data" in item:
            data, found = item.get("data") or {}, _latest(item.get("annotations") or [])
        else:  # JSON-min: the task's data and the latest annotation's values side by side
            data, fixed = item, item.get("fixed")
            fixed = [t for t in (fixed if isinstance(fixed, list) else [fixed]) if isinstance(t, str) and t.strip()]
            found = item.get("verdict") and {
                "verdict": item["verdict"], "fixed_expression": fixed[-1].strip() if fixed else None,
                "annotation": item.get("annotation_id"), "annotator": _annotator(item.get("annotator")),
                "annotated_at": item.get("updated_at") or ""}
        if not {"shard", "index", "object", "stratum"} <= set(data):
            raise ExportError(f"{path}: a task without sculpt's ids (shard, index, object, stratum): not exported "
                              "from a project of `sculpt review sample` tasks")
        if not found:
            continue  # not reviewed (yet), or skipped
        row = {name: data.get(name) for name in VERDICT_SCHEMA.names if name in data}
        row.update(found, good=found["verdict"] == "accept", task=item.get("id"), imported_at=now)
        key = (data["shard"], data["index"], data["object"])
        if key not in rows or row["annotated_at"] >= rows[key]["annotated_at"]:
            rows[key] = row
    return list(rows.values())


def read_verdicts(out: str, s3: S3Options = S3Options()) -> list[dict]:
    data = storage.read_bytes(storage.join(out, VERDICTS), s3)
    return [] if data is None else pq.read_table(pa.BufferReader(data)).to_pylist()


def import_verdicts(out: str, path: str, s3: S3Options = S3Options()) -> dict:
    """Merge an export's verdicts into OUT's review table; a pair already there takes the new verdict."""
    new = read_export(path)
    old = read_verdicts(out, s3)
    keys = {(r["shard"], r["index"], r["object"]) for r in new}
    kept_old = [r for r in old if (r["shard"], r["index"], r["object"]) not in keys]
    rows = sorted(kept_old + new, key=lambda r: (r["shard"], r["index"], r["object"]))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=VERDICT_SCHEMA), sink, compression="zstd")
    storage.write_atomic(storage.join(out, VERDICTS), sink.getvalue().to_pybytes(), s3)
    return {"imported": len(new), "replaced": len(old) - len(kept_old), "verdicts": len(rows),
            "path": storage.join(out, VERDICTS)}


# -- the report -------------------------------------------------------------------------------------------------

def wilson(p: float, n: float, z: float = Z) -> tuple[float, float]:
    """Wilson's score interval of a proportion p observed on n (here the effective sample size)."""
    if n <= 0:
        return 0.0, 1.0
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def weigh(verdicts: list[dict]) -> list[dict]:
    """Each verdict with ``weight``: its stratum's size over the verdicts of that stratum."""
    reviewed, size = {}, {}
    for v in verdicts:
        reviewed[v["stratum"]] = reviewed.get(v["stratum"], 0) + 1
        size[v["stratum"]] = max(size.get(v["stratum"], 0), v["stratum_size"] or 0)
    return [{**v, "weight": size[v["stratum"]] / reviewed[v["stratum"]]} for v in verdicts]


def share(rows: list[dict], hit) -> dict | None:
    """The weighted share of rows for which hit(row) holds, with its Wilson interval; None without rows."""
    total = sum(r["weight"] for r in rows)
    if not rows or total <= 0:
        return None
    p = sum(r["weight"] for r in rows if hit(r)) / total
    n_eff = total * total / sum(r["weight"] ** 2 for r in rows)
    low, high = wilson(p, n_eff)
    return {"p": p, "low": low, "high": high, "reviewed": len(rows), "n_eff": n_eff, "pairs": total}


def threshold_for(kept: list[dict], target: float) -> dict | None:
    """The lowest IoU t at which kept pairs with iou >= t reach the target precision (estimate, and lower bound)."""
    total = sum(r["weight"] for r in kept)
    found = {}
    for t in sorted({r["iou"] for r in kept if r["iou"] is not None}):
        above = [r for r in kept if r["iou"] is not None and r["iou"] >= t]
        s = share(above, lambda r: r["good"])
        for name, value in (("estimate", s["p"]), ("lower", s["low"])):
            if name not in found and value >= target:
                found[name] = {"iou": t, **s, "keeps": s["pairs"] / total}
    return found or None


def summarize(verdicts: list[dict], target: float = 0.9) -> dict:
    rows = weigh(verdicts)
    kept = [r for r in rows if r["kept"] is True]
    good = [r for r in rows if r["good"]]
    result = {"verdicts": len(rows), "accepted": len(good), "strata": len({r["stratum"] for r in rows}),
              "fixed": sum(bool(r["fixed_expression"]) for r in rows), "target": target,
              "precision": share(kept, lambda r: r["good"]), "recall": share(good, lambda r: r["kept"] is True),
              "categories": {}, "checks": {}, "threshold": threshold_for(kept, target)}
    for category in sorted({r["category"] or "none" for r in rows}):
        mine = [r for r in rows if (r["category"] or "none") == category]
        result["categories"][category] = {
            "precision": share([r for r in mine if r["kept"] is True], lambda r: r["good"]),
            "recall": share([r for r in mine if r["good"]], lambda r: r["kept"] is True)}
    for name in sorted({r["check"] for r in rows}):
        result["checks"][name] = share([r for r in rows if r["check"] == name], lambda r: r["good"])
    return result


def _figure(s: dict | None) -> str:
    if s is None:
        return "-     (no verdicts)"
    return (f"{s['p']:.3f} [{s['low']:.3f}, {s['high']:.3f}]  ({s['reviewed']} reviewed, effective {s['n_eff']:.1f}, "
            f"standing for {s['pairs']:.0f} pairs)")


def render(out: str, summary: dict) -> str:
    s = summary
    lines = [f"review of {out}: {s['verdicts']} pairs judged ({s['accepted']} accepted, {s['fixed']} with a better "
             f"expression) in {s['strata']} strata; each verdict weighs its stratum's pairs / its stratum's verdicts; "
             "95 % Wilson intervals at the effective sample size",
             f"precision of kept pairs   {_figure(s['precision'])}",
             f"recall of good pairs      {_figure(s['recall'])}",
             "by category"]
    for category, c in s["categories"].items():
        lines += [f"  {category:12s} precision {_figure(c['precision'])}",
                  f"  {'':12s} recall    {_figure(c['recall'])}"]
    lines.append("by check (share judged good of the pairs it decided)")
    lines += [f"  {name:22s} good {_figure(c)}" for name, c in s["checks"].items()]
    t = s["threshold"]
    if t is None:
        lines.append(f"IoU threshold for precision {s['target']:.2f}: not reached on the sample at any IoU")
    else:
        for name, what in (("estimate", "estimate"), ("lower", "interval's lower bound")):
            if name in t:
                x = t[name]
                lines.append(f"IoU threshold for precision {s['target']:.2f} ({what}): {x['iou']:.3f} -> precision "
                             f"{_figure(x)}, keeps {x['keeps']:.1%} of kept pairs")
            else:
                lines.append(f"IoU threshold for precision {s['target']:.2f} ({what}): not reached on the sample")
    return "\n".join(lines)


def report(out: str, target: float = 0.9, s3: S3Options = S3Options()) -> str:
    verdicts = read_verdicts(out, s3)
    if not verdicts:
        raise ExportError(f"{out}: no verdicts yet (sculpt review import OUT EXPORT.json)")
    return render(out, summarize(verdicts, target))
