"""``sculpt preview OUT [DEST]``: a static HTML gallery of what a job made, to look at before training on it.

One card per image: the image scaled down (longest side ``max_side`` px, a JPEG embedded as a data URI), each
object's mask as a coloured semi-transparent overlay (decoded by pycocotools, one PNG per object) with its box,
and beside it the object's phrase, expression, IoU and kept/rejected (with its ``reject_reason``, the first check
of the keep rule it failed) and ``category``, where the output has those fields. Error and empty rows get a card
too, saying so.

The filter at the top shows kept, rejected or all objects, and one category or all; a card with no object
shown hides, except under "all". The filter lives in the address's fragment (``index.html#show=kept&category=
stuff``), so it follows the page links. ``per_page`` cards a page: ``index.html``, ``page-0002.html``, … each
self-contained (no network, nothing beside it), so DEST may be local or ``s3://``. ``limit`` images at most
(0: all), in output order (shard by shard, each in index order). Each page's ``<body>`` carries ``data-cards``
(its cards) and, once the filter ran, ``data-visible`` (those shown).

Rows and images come from the readers ``sculpt export`` uses (``pairs.iter_rows``, ``pairs.ShardImages``): the
images stream from the job's input shards, each shard's tar once.
"""

from __future__ import annotations

import base64
import html
import io
import os
import shutil
import subprocess
import tempfile

import numpy as np

from sculpt.outputs import export, pairs
from sculpt.annotation import images, rle
from sculpt import schema
from sculpt.io import storage
from sculpt.io.storage import S3Options

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60)]
ALPHA = 115  # of 255: the image stays readable under a mask
PER_PAGE = 48
LIMIT = 500
MAX_SIDE = 512


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail(data: bytes, max_side: int = MAX_SIDE) -> bytes:
    """The image upright (as the stages saw it), longest side at most ``max_side``, as a JPEG."""
    from PIL import Image

    image = Image.fromarray(images.load_rgb(data))
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=82)
    return buffer.getvalue()


def shown_size(width: int, height: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """The size a card shows an image of width×height at (never enlarged)."""
    scale = min(1.0, max_side / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def mask_png(mask: dict, size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    """A COCO RLE mask as a ``size`` (w, h) RGBA PNG: ``colour`` at ALPHA where the mask is, clear elsewhere."""
    from PIL import Image

    alpha = Image.fromarray(rle.decode(mask).astype(np.uint8) * ALPHA, "L").resize(size, Image.Resampling.NEAREST)
    overlay = Image.new("RGBA", size, colour + (0,))
    overlay.putalpha(alpha)
    buffer = io.BytesIO()
    overlay.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _percent(box, width: int, height: int) -> str:
    x0, y0, x1, y1 = box
    return (f"left:{100 * x0 / width:.3f}%;top:{100 * y0 / height:.3f}%;"
            f"width:{100 * (x1 - x0) / width:.3f}%;height:{100 * (y1 - y0) / height:.3f}%")


def object_attributes(obj: dict) -> str:
    """The data attributes the filter reads: kept (1, 0, or '' when never verified) and category."""
    kept = {True: "1", False: "0"}.get(obj.get("kept"), "")
    return f'data-kept="{kept}" data-category="{html.escape(obj.get("category") or "")}"'


def object_line(obj: dict, colour: tuple[int, int, int]) -> str:
    iou = f"IoU {obj['iou']:.2f}" if obj.get("iou") is not None else "not verified"
    verdict = {True: "kept", False: "rejected"}.get(obj.get("kept"), "")
    why = f' ({html.escape(obj["reject_reason"])})' if verdict == "rejected" and obj.get("reject_reason") else ""
    parts = [f'<b>{html.escape(obj.get("phrase") or "")}</b>',
             f'&ldquo;{html.escape(obj.get("expression") or "")}&rdquo;' if obj.get("expression") else "",
             iou, f'<span class="{verdict}">{verdict}{why}</span>' if verdict else "",
             f'<i>{html.escape(obj["category"])}</i>' if obj.get("category") else "",
             f'<i class="reasoning">reasoning, names #{obj["target"]}</i>' if obj.get("style") == "reasoning" else "",
             f'<span class="members">{len(obj["members"])} members</span>' if obj.get("members") else "",
             f'<span class="rejected">{html.escape(obj["error"])}</span>' if obj.get("error") else ""]
    swatch = f'<span class="swatch" style="background:rgb{colour}"></span>'
    return f'<li {object_attributes(obj)}>{swatch}{" · ".join(p for p in parts if p)}</li>'


def card_html(row: dict, image: bytes | None, max_side: int = MAX_SIDE) -> str:
    """One image's card: picture, overlays and boxes, and the list of its objects."""
    width, height = row.get("width") or 0, row.get("height") or 0
    title = f'{html.escape(row["shard"])} #{row["index"]} · {html.escape(row.get("image_key") or "")}'
    if row.get("status") == schema.ERROR or not width or not height:
        return (f'<div class="card" data-status="error"><div class="title">{title}</div>'
                f'<p class="rejected">{html.escape(row.get("error") or "no image")}</p></div>')
    shown = shown_size(width, height, max_side)
    layers = [f'<img class="photo" src="{data_uri("image/jpeg", thumbnail(image, max_side))}" alt="">' if image
              else '<div class="photo missing">image not in the input shard</div>']
    lines = []
    for position, obj in enumerate(row.get("objects") or []):
        colour = PALETTE[position % len(PALETTE)]
        if obj.get("mask"):
            layers.append(f'<img class="mask" {object_attributes(obj)} alt="" '
                          f'src="{data_uri("image/png", mask_png(obj["mask"], shown, colour))}">')
        if obj.get("box") is not None:
            style = "dashed" if obj.get("kept") is False else "solid"
            layers.append(f'<div class="box" {object_attributes(obj)} style="{_percent(obj["box"], width, height)};'
                          f'border:2px {style} rgb{colour}"></div>')
        lines.append(object_line(obj, colour))
    caption = f'<p class="caption">{html.escape(row["caption"])}</p>' if row.get("caption") else ""
    reasoned = [o for o in row.get("objects") or [] if o.get("style") == "reasoning"]
    if reasoned:  # counted per card: reasoning references, and how many were kept
        caption += (f'<p class="reasoning" data-reasoning="{len(reasoned)}">{len(reasoned)} reasoning reference(s), '
                    f'{sum(bool(o.get("kept")) for o in reasoned)} kept</p>')
    return (f'<div class="card" data-status="{html.escape(row.get("status") or "")}" style="width:{shown[0]}px">'
            f'<div class="title">{title}</div><div class="frame" style="width:{shown[0]}px;height:{shown[1]}px">'
            f'{"".join(layers)}</div>{caption}<ul>{"".join(lines) or "<li>no objects</li>"}</ul></div>')


STYLE = """
body{font:13px/1.35 system-ui,sans-serif;margin:12px;background:#f4f4f4;color:#222}
header{margin-bottom:10px} header a{margin-right:6px}
.card{display:inline-block;vertical-align:top;margin:0 10px 12px 0;background:#fff;padding:6px;border-radius:4px;
  box-shadow:0 1px 2px #0003}
.title{font-weight:600;margin-bottom:4px;overflow-wrap:anywhere}
.frame{position:relative;background:#ddd} .frame>*{position:absolute;left:0;top:0}
.photo,.mask{width:100%;height:100%} .missing{padding:8px;color:#666}
.box{box-sizing:border-box} ul{padding-left:0;margin:6px 0 0;list-style:none} li{margin:2px 0}
.swatch{display:inline-block;width:11px;height:11px;margin-right:5px;vertical-align:-1px}
.kept{color:#1a7f37} .rejected{color:#c0392b} .caption{color:#555;margin:4px 0 0}
[hidden]{display:none!important}
"""

SCRIPT = """
const cards = [...document.querySelectorAll('.card')];
const wanted = () => Object.fromEntries(new URLSearchParams(location.hash.slice(1)));
function shows(el, f) {
  const kept = el.dataset.kept;
  const byKept = f.show === 'kept' ? kept === '1' : f.show === 'rejected' ? kept === '0' : true;
  return byKept && (!f.category || el.dataset.category === f.category);
}
function apply() {
  const f = wanted(); f.show = f.show || 'all';
  document.getElementById('show').value = f.show;
  document.getElementById('category').value = f.category || '';
  let visible = 0;
  for (const card of cards) {
    let any = false;
    for (const el of card.querySelectorAll('[data-kept]')) { el.hidden = !shows(el, f); any = any || !el.hidden; }
    card.hidden = !(any || (f.show === 'all' && !f.category));
    visible += !card.hidden;
  }
  document.body.dataset.visible = visible;
  document.getElementById('count').textContent = visible + ' of ' + cards.length + ' cards shown';
  for (const a of document.querySelectorAll('a.page')) a.setAttribute('href', a.dataset.href + location.hash);
}
function choose() {
  const f = {show: document.getElementById('show').value, category: document.getElementById('category').value};
  location.hash = new URLSearchParams(Object.entries(f).filter(([k, v]) => v)).toString();
}
window.addEventListener('hashchange', apply);
apply();
"""


def page_name(page: int) -> str:
    return "index.html" if page == 1 else f"page-{page:04d}.html"


def page_html(cards: list[str], categories: set[str], page: int, has_next: bool, out: str) -> str:
    def link(to: int, text: str) -> str:
        return f'<a class="page" data-href="{page_name(to)}" href="{page_name(to)}">{text}</a>'

    links = [link(page - 1, "&larr; previous") if page > 1 else "", f"page {page}",
             link(page + 1, "next &rarr;") if has_next else ""]
    options = "".join(f'<option value="{html.escape(c)}">{html.escape(c)}</option>' for c in sorted(categories))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sculpt preview · {html.escape(out)} · page {page} · {len(cards)} cards</title>
<style>{STYLE}</style></head>
<body data-cards="{len(cards)}" data-page="{page}">
<header><b>sculpt preview</b> of {html.escape(out)} · {" ".join(link for link in links if link)} ·
show <select id="show" onchange="choose()"><option value="all">all objects</option><option value="kept">kept</option>
<option value="rejected">rejected</option></select>
category <select id="category" onchange="choose()"><option value="">any</option>{options}</select>
<span id="count"></span></header>
{"".join(cards)}
<script>{SCRIPT}</script>
</body></html>
"""


def write_preview(out: str, dest: str, s3: S3Options = S3Options(), per_page: int = PER_PAGE, limit: int = LIMIT,
                  max_side: int = MAX_SIDE, shards: list[str] | None = None) -> dict:
    """Write the gallery's pages to DEST; returns {"cards", "pages", "index"} (index: the first page's path)."""
    if not pairs.data_files(out, s3):
        raise pairs.ExportError(f"{out}: no sculpt output here (no committed Parquet files)")
    if per_page < 1:
        raise ValueError(f"per_page must be at least 1, got {per_page}")
    fs, path = storage.filesystem(dest, s3)
    for name in storage.list_names(dest, s3, ".html"):  # a previous preview's pages, which may be more than these
        if name == page_name(1) or name.startswith("page-"):
            fs.delete_file(f"{path}/{name}")
    source = pairs.ShardImages(out, s3, shards)
    page, cards, categories, total = 1, [], set(), 0

    def write(has_next: bool) -> None:
        storage.write_atomic(storage.join(dest, page_name(page)),
                             page_html(cards, categories, page, has_next, out).encode(), s3)

    for row in pairs.iter_rows(out, s3):
        if limit and total >= limit:
            break
        if len(cards) == per_page:  # a full page is written once the next one has a card: it links to it
            write(has_next=True)
            page, cards, categories = page + 1, [], set()
        image = source.get(row) if row.get("status") != schema.ERROR else None
        cards.append(card_html(row, image, max_side))
        categories.update(o["category"] for o in row.get("objects") or [] if o.get("category"))
        total += 1
    write(has_next=False)
    export.tidy_tmp(storage.join(dest, "x"), s3)
    return {"cards": total, "pages": page, "index": storage.join(dest, page_name(1))}


class NoBrowser(RuntimeError):
    pass


def chromium() -> str:
    """Debian's chromium (or another Chromium on PATH)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise NoBrowser("no chromium on PATH: `make install` installs Debian's as root (apt-get install chromium)")


def browse(url: str, *flags: str, timeout: float = 120) -> str:
    """Run headless Chromium on ``url`` with ``flags``; returns its stdout."""
    with tempfile.TemporaryDirectory() as profile:
        command = [chromium(), "--headless", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
                   "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                   "--virtual-time-budget=5000", *flags, url]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.insert(1, "--no-sandbox")  # Chromium refuses its sandbox to root
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def dump_dom(html_path: str, fragment: str = "") -> str:
    """The page's DOM after its script ran (``fragment``: e.g. ``show=kept``)."""
    return browse(f"file://{os.path.abspath(html_path)}" + (f"#{fragment}" if fragment else ""), "--dump-dom")


def screenshot(html_path: str, png_path: str, size: tuple[int, int] = (1280, 900), colours: int | None = None) -> str:
    """A PNG of the page as headless Chromium draws it; ``colours``: reduce to that many (a small file)."""
    png_path = os.path.abspath(png_path)
    os.makedirs(os.path.dirname(png_path), exist_ok=True)
    browse(f"file://{os.path.abspath(html_path)}", f"--screenshot={png_path}", f"--window-size={size[0]},{size[1]}")
    if colours:
        from PIL import Image

        with Image.open(png_path) as image:
            small = image.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        small.save(png_path, optimize=True)
    return png_path

