"""``sculpt report OUT``: the whole job's statistics from its markers, as text, PNG plots and one HTML page
(``index.html`` beside the plots: the key figures with their units, the keep rule's funnel, then the plots)."""

from __future__ import annotations

import html
import os

from sculpt.outputs import stats
from sculpt.outputs.store import OutputStore, shards_line


def job_stats(store: OutputStore) -> tuple[dict, list[dict]]:
    markers = store.markers()
    total = stats.empty()
    for marker in markers:
        stats.merge(total, {key: marker[key] for key in total if key in marker})
    return total, markers


def images_summary(total: dict) -> str:
    """The one wording of the image count, for status and report alike."""
    errors = total["errors"] - (total["rows"] - total["images"])  # an unreadable shard's row is not an image's
    shards = total["rows"] - total["images"]
    return f"{total['images']} ({errors} errors" + (f"; {shards} shard(s) unreadable as a whole" if shards else "") + ")"


def kind_figures(total: dict) -> list[tuple[str, str, str]]:
    """(what, value, unit) rows of the kinds of pairs: kept per category, group sizes."""
    rows = []
    for category, pairs in sorted(total.get("pairs_by_category", {}).items()):
        kept = total.get("kept_by_category", {}).get(category, 0)
        rows.append((f"{category} pairs kept", f"{kept} of {pairs}", f"pairs ({kept / pairs:.1%})"))
    if total.get("reasoning_pairs"):
        kept, pairs = total.get("reasoning_kept", 0), total["reasoning_pairs"]
        rows.append(("reasoning pairs kept", f"{kept} of {pairs}", f"pairs ({kept / pairs:.1%}; in the categories above)"))
    sizes = total.get("group_sizes", {})
    if sizes:
        spread = ", ".join(f"{n} of {k}" for k, n in sorted(sizes.items(), key=lambda kv: int(kv[0])))
        rows.append(("multi-object groups", f"{sum(sizes.values())}", f"groups (by members: {spread})"))
    return rows


def funnel_table(total: dict) -> list[list[str]]:
    """The keep rule's funnel as a table: a header (category, pairs, each check that removed any pair, in the rule's
    order, kept), one row per category and one for all; no rows when no check removed a pair."""
    steps = stats.funnel(total)
    reasons = list(steps["all"]["removed"])
    if not reasons:
        return []
    rows = [["category", "pairs", *reasons, "kept"]]
    for category, step in steps.items():
        removed = step["removed"]
        rows.append([category, str(step["kept"] + sum(removed.values())),
                     *(str(removed.get(reason, 0)) for reason in reasons), str(step["kept"])])
    return rows


def render(out: str, job: dict, total: dict, markers: list[dict]) -> str:
    d = stats.derived(total)
    lines = [
        f"output            {out} (config {job['fingerprint']}, prompts {job.get('prompts_version')})",
        f"shards            {shards_line(job, markers)}",
        f"images            {images_summary(total)}; {total['empty']} without objects",
        f"objects           {total['objects']} ({d['objects_per_image']:.2f} per image; {total['object_errors']} with errors)",
    ]
    if d["keep_rate"] is not None:
        lines.append(f"verified          {total['verified']}, kept {total['kept']} (keep rate {d['keep_rate']:.1%})")
        peak = max(total["iou_histogram"]) or 1
        for i, n in enumerate(total["iou_histogram"]):
            lines.append(f"  IoU {i / stats.IOU_BINS:.1f}-{(i + 1) / stats.IOU_BINS:.1f}  {n:7d} {'#' * round(30 * n / peak)}")
    lines += [f"{what:17s} {value} {unit}" for what, value, unit in kind_figures(total)]
    funnel = funnel_table(total)
    if funnel:
        lines.append("keep rule funnel  pairs removed by the first check each failed")
        widths = [max(len(row[i]) for row in funnel) for i in range(len(funnel[0]))]
        lines += ["  " + "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                  for row in funnel]
    if d["words_per_expression"] is not None:
        lines.append(f"expressions       {sum(total['expression_words'].values())}, {d['words_per_expression']:.1f} words on average")
    for stage in total["stage_seconds"]:
        rate = d["stage_images_per_second"].get(stage)
        if rate is None:
            lines.append(f"stage {stage:11s} no work on these images")
        else:
            busy_ms = total["stage_seconds"][stage] / total["stage_images"][stage] * 1000
            lines.append(f"stage {stage:11s} {rate:8.2f} img/s per actor ({busy_ms:.1f} ms busy per image)")
    if total["error_kinds"]:
        lines.append("errors by kind")
        for kind, n in sorted(total["error_kinds"].items(), key=lambda kv: -kv[1])[:15]:
            lines.append(f"  {n:7d}  {kind}")
    return "\n".join(lines)


def plot(total: dict, directory: str) -> list[str]:
    """PNG plots of the distributions; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)

    def keyed(counts: dict) -> tuple[list[int], list[int]]:
        keys = sorted(int(k) for k in counts)
        return keys, [counts[str(k)] for k in keys]

    figures = {  # name: title, x label, y label, xs, ys, bar width
        "iou_histogram.png": ("IoU of verifier mask vs SAM2 mask", "IoU (bins of 0.1)", "objects",
                              [i / stats.IOU_BINS for i in range(stats.IOU_BINS)], total["iou_histogram"], 1 / stats.IOU_BINS),
        "objects_per_image.png": ("Objects per image", "objects in the image", "images",
                                  *keyed(total["objects_per_image"]), 0.8),
        "expression_words.png": ("Words per referring expression", "words", "expressions",
                                 *keyed(total["expression_words"]), 0.8),
        "stage_throughput.png": ("Busy time per image, by stage (per actor)", "stage", "ms per image",
                                 list(total["stage_seconds"]),
                                 [1000 * s / total["stage_images"][k] for k, s in total["stage_seconds"].items()], 0.6),
    }
    paths = []
    for name, (title, xlabel, ylabel, xs, ys, width) in figures.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bars = ax.bar(xs, ys, width=width, align="edge" if name == "iou_histogram.png" else "center")
        ax.bar_label(bars, fmt="%.1f" if name == "stage_throughput.png" else "%d", fontsize=8)  # values, not guesses
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.margins(y=0.15)
        if name in ("objects_per_image.png", "expression_words.png") and xs:  # counts: whole ticks, never 4.6 objects
            ax.set_xticks(xs[:: max(1, len(xs) // 20)])
            ax.set_xlim(min(xs) - 1, max(xs) + 1)
        fig.tight_layout()
        paths.append(os.path.join(directory, name))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def figures(job: dict, total: dict, markers: list[dict]) -> list[tuple[str, str, str]]:
    """(what, value, unit) rows of the job's key figures."""
    d = stats.derived(total)
    rows = [("shards", shards_line(job, markers), "shards"),
            ("images", f"{total['images']}", "images"),
            ("error rows", f"{total['errors']}", f"rows ({d['error_rate']:.1%})"),
            ("images without objects", f"{total['empty']}", "images"),
            ("objects", f"{total['objects']}", f"objects ({d['objects_per_image']:.2f} per image)"),
            ("objects with errors", f"{total['object_errors']}", "objects")]
    if d["keep_rate"] is not None:
        rows += [("verified", f"{total['verified']}", "objects"),
                 ("kept (passed the keep rule)", f"{total['kept']}", f"objects ({d['keep_rate']:.1%} of verified)")]
    rows += kind_figures(total)
    if d["words_per_expression"] is not None:
        rows.append(("words per expression", f"{d['words_per_expression']:.1f}", "words (mean)"))
    for stage, rate in d["stage_images_per_second"].items():
        busy_ms = 1000 * total["stage_seconds"][stage] / total["stage_images"][stage]
        rows.append((f"stage {stage}", f"{rate:.2f}", f"images/s per actor ({busy_ms:.1f} ms busy per image)"))
    return rows


def page(out: str, job: dict, total: dict, markers: list[dict], plots: list[str]) -> str:
    """One HTML page: the key figures, the errors by kind, and the plots (named relative to the page)."""
    cells = "".join(f"<tr><th>{html.escape(what)}</th><td>{html.escape(value)}</td><td>{html.escape(unit)}</td></tr>"
                    for what, value, unit in figures(job, total, markers))
    table = funnel_table(total)
    funnel = "".join("<tr>" + "".join(f"<{tag}>{html.escape(cell)}</{tag}>" for cell in row) + "</tr>"
                     for tag, row in zip(["th"] + ["td"] * len(table), table))
    kinds = "".join(f"<tr><td>{n}</td><td>{html.escape(kind)}</td></tr>"
                    for kind, n in sorted(total["error_kinds"].items(), key=lambda kv: -kv[1])[:15])
    images = "".join(f'<img src="{html.escape(os.path.basename(p))}" alt="{html.escape(os.path.basename(p))}">' for p in plots)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sculpt report · {html.escape(out)}</title><style>
body{{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222}} table{{border-collapse:collapse;margin:8px 0 16px}}
th,td{{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}} td:nth-child(2){{text-align:right;font-weight:600}}
.funnel td{{text-align:right}} .funnel td:first-child{{text-align:left}}
img{{width:480px;margin:0 8px 8px 0;border:1px solid #eee}}</style></head>
<body><h2>sculpt report</h2><p>{html.escape(out)} · config {html.escape(str(job.get("fingerprint")))} ·
prompts {html.escape(str(job.get("prompts_version")))}</p>
<table>{cells}</table>
{f'<h3>Keep rule funnel</h3><p>pairs removed by the first check each failed (README: the keep rule)</p>'
 f'<table class="funnel">{funnel}</table>' if funnel else ""}
{f"<h3>Errors by kind</h3><table>{kinds}</table>" if kinds else ""}
<div>{images}</div></body></html>
"""
