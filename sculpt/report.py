"""``sculpt report OUT``: the whole job's statistics from its markers, as text and as PNG plots."""

from __future__ import annotations

import os

from sculpt import stats
from sculpt.output import OutputStore


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


def render(out: str, job: dict, total: dict, units: int) -> str:
    d = stats.derived(total)
    lines = [
        f"output            {out} (config {job['fingerprint']}, prompts {job.get('prompts_version')})",
        f"shards            {units}/{job.get('total_shards', '?')} committed",
        f"images            {images_summary(total)}; {total['empty']} without objects",
        f"objects           {total['objects']} ({d['objects_per_image']:.2f} per image; {total['object_errors']} with errors)",
    ]
    if d["keep_rate"] is not None:
        lines.append(f"verified          {total['verified']}, kept {total['kept']} (keep rate {d['keep_rate']:.1%})")
        peak = max(total["iou_histogram"]) or 1
        for i, n in enumerate(total["iou_histogram"]):
            lines.append(f"  IoU {i / stats.IOU_BINS:.1f}-{(i + 1) / stats.IOU_BINS:.1f}  {n:7d} {'#' * round(30 * n / peak)}")
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

    d = stats.derived(total)
    figures = {
        "iou_histogram.png": ("IoU of verifier mask vs SAM2 mask", "IoU", [i / stats.IOU_BINS for i in range(stats.IOU_BINS)],
                              total["iou_histogram"], 1 / stats.IOU_BINS),
        "objects_per_image.png": ("Objects per image", "objects", *keyed(total["objects_per_image"]), 0.8),
        "expression_words.png": ("Words per referring expression", "words", *keyed(total["expression_words"]), 0.8),
        "stage_throughput.png": ("Busy time per image, by stage (per actor)", "stage", list(total["stage_seconds"]),
                                 [1000 * s / total["stage_images"][k] for k, s in total["stage_seconds"].items()], 0.6),
    }
    paths = []
    for name, (title, xlabel, xs, ys, width) in figures.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(xs, ys, width=width, align="edge" if name == "iou_histogram.png" else "center")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count" if name != "stage_throughput.png" else "ms")
        fig.tight_layout()
        paths.append(os.path.join(directory, name))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
