"""sculpt preview: the gallery rendered by headless Chromium (Debian's package) shows the cards, masks and filters."""

import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from sculpt import cli
from sculpt.outputs import preview
from sculpt.testing import samples
from tests.test_export import obj, shard_output

W, H = 200, 160
GREY = 128
KEPT_BOX, REJECTED_BOX = (10, 10, 90, 70), (110, 80, 190, 150)  # x0, y0, x1, y1: 80×60 and 80×70 pixels


@pytest.fixture
def browser():
    if shutil.which("chromium"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        pytest.fail("chromium is missing but this user can install it: run `make install` (it apt-gets Debian's chromium)")
    pytest.skip("chromium is not installed and this user cannot install it (needs root and apt-get): "
                "apt-get install chromium, then rerun")


def two_objects(h, w):
    judged = {"category": "single", "verifier_area": 1}
    return [{**obj(KEPT_BOX, 0.9, "the left patch", phrase="left patch", size=(h, w)), **judged},
            {**obj(REJECTED_BOX, 0.2, "the right patch", phrase="right patch", size=(h, w)), **judged,
             "reject_reason": "low_iou"}]


@pytest.fixture
def gallery(tmp_path):
    """Three flat grey images of one shard, each with a kept and a rejected object; two cards a page."""
    grey = np.full((H, W, 3), GREY, np.uint8)
    out = shard_output(tmp_path, [samples.jpeg_bytes(grey, quality=95)] * 3, two_objects)
    assert cli.main(["preview", out, str(tmp_path / "preview"), "--per-page", "2"]) == 0
    return tmp_path / "preview"


def cards_in(dom: str) -> tuple[int, int]:
    """(data-cards, data-visible) of the page's body."""
    body = re.search(r"<body[^>]*>", dom).group(0)
    return int(re.search(r'data-cards="(\d+)"', body).group(1)), int(re.search(r'data-visible="(\d+)"', body).group(1))


def blended(colour):
    a = preview.ALPHA / 255
    return np.array([c * a + GREY * (1 - a) for c in colour])


def pixels_near(image: np.ndarray, colour, tolerance=12) -> int:
    return int((np.abs(image.astype(int) - colour).max(axis=2) <= tolerance).sum())


def test_pages_hold_their_cards_and_the_filter_hides_rejected_objects(gallery, browser):
    first = preview.dump_dom(str(gallery / "index.html"))
    assert cards_in(first)[0] > 0
    assert cards_in(first) == (2, 2) and first.count('class="card"') == 2
    assert 'href="page-0002.html' in first and sorted(os.listdir(gallery)) == ["index.html", "page-0002.html"]
    last = preview.dump_dom(str(gallery / "page-0002.html"))
    assert cards_in(last) == (1, 1) and "next" not in last and 'href="index.html' in last
    kept = preview.dump_dom(str(gallery / "index.html"), "show=kept")
    assert cards_in(kept) == (2, 2)
    hidden = re.findall(r'<(?:img|div|li) class="[^"]*"[^>]*data-kept="(\d)"[^>]*hidden=""', kept)
    hidden += re.findall(r'<li data-kept="(\d)"[^>]*hidden=""', kept)
    assert len(hidden) == 2 * 3 and set(hidden) == {"0"}  # mask, box and line of each card's rejected object
    assert "the left patch" in kept and "IoU 0.90" in kept and "IoU 0.20" in kept
    assert first.count('<span class="rejected">rejected (low_iou)</span>') == 2  # why, on each rejected pair


def test_screenshot_shows_each_mask_in_its_colour(gallery, browser, tmp_path):
    shot = preview.screenshot(str(gallery / "index.html"), str(tmp_path / "shot.png"), (1000, 700))
    image = np.array(Image.open(shot).convert("RGB"))
    assert image.shape == (700, 1000, 3) and image.std() > 10  # drawn, not blank
    assert pixels_near(image, np.array([GREY] * 3), 4) > 0.3 * 2 * W * H - 2 * (80 * 60 + 80 * 70)
    kept_area, rejected_area = 76 * 56, 76 * 66  # inside the 2-pixel box borders, drawn over the masks' edges
    assert pixels_near(image, blended(preview.PALETTE[0])) >= 0.9 * 2 * kept_area
    assert pixels_near(image, blended(preview.PALETTE[1])) >= 0.9 * 2 * rejected_area
    filtered = tmp_path / "kept.png"
    preview.browse(f"file://{gallery / 'index.html'}#show=kept", f"--screenshot={filtered}", "--window-size=1000,700")
    image = np.array(Image.open(filtered).convert("RGB"))
    assert pixels_near(image, blended(preview.PALETTE[0])) >= 0.9 * 2 * kept_area
    assert pixels_near(image, blended(preview.PALETTE[1])) < 0.01 * rejected_area


def test_category_filter_on_outputs_that_have_the_field(tmp_path, browser):
    rows = []
    for index, categories in enumerate((("stuff", "single"), ("single", "single"))):
        objects = [{**o, "category": c, "members": [0, 1] if c == "stuff" else None}
                   for o, c in zip(two_objects(H, W), categories)]
        rows.append({"shard": "sa_000000", "index": index, "image_key": f"sa_{index}", "width": W, "height": H,
                     "status": "ok", "caption": "x", "objects": objects})
    page = tmp_path / "index.html"
    cards = [preview.card_html(row, samples.jpeg_bytes(np.full((H, W, 3), GREY, np.uint8))) for row in rows]
    page.write_text(preview.page_html(cards, {"stuff", "single"}, 1, False, "out"))
    assert cards_in(preview.dump_dom(str(page)))[0] == 2
    assert cards_in(preview.dump_dom(str(page), "category=stuff")) == (2, 1)
    assert cards_in(preview.dump_dom(str(page), "category=single")) == (2, 2)
    assert cards_in(preview.dump_dom(str(page), "show=rejected&category=stuff")) == (2, 0)
    assert '<option value="stuff">' in page.read_text() and "2 members" in page.read_text()


def test_a_rejected_pair_shows_the_check_it_failed_and_an_older_outputs_pair_shows_rejected():
    kept, rejected = two_objects(H, W)
    assert '<span class="rejected">rejected (low_iou)</span>' in preview.object_line(rejected, (0, 0, 0))
    assert '<span class="kept">kept</span> ·' in preview.object_line(kept, (0, 0, 0))
    assert "rival" not in preview.object_line({**kept, "reject_reason": "rival"}, (0, 0, 0))  # only a rejected one's
    older = {key: value for key, value in rejected.items() if key != "reject_reason"}  # written before the field
    assert '<span class="rejected">rejected</span>' in preview.object_line(older, (0, 0, 0))
    quoted = preview.object_line({**rejected, "reject_reason": "<b>x</b>"}, (0, 0, 0))
    assert "rejected (&lt;b&gt;x&lt;/b&gt;)" in quoted


def test_error_and_empty_rows_get_cards_and_a_missing_output_is_refused(tmp_path, capsys):
    card = preview.card_html({"shard": "s", "index": 3, "image_key": "sa_3", "status": "error", "error": "read: cut off"}, None)
    assert 'data-status="error"' in card and "read: cut off" in card
    empty = preview.card_html({"shard": "s", "index": 4, "image_key": "sa_4", "status": "empty", "width": W, "height": H,
                               "objects": []}, None)
    assert "no objects" in empty and "image not in the input shard" in empty
    assert cli.main(["preview", str(tmp_path / "nothing")]) == 1
    assert "no sculpt output" in capsys.readouterr().err


def test_s3_output_previews_to_s3(s3_server, tmp_path):
    import boto3

    from sculpt.io import storage

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="preview")
    s3 = storage.S3Options(endpoint=s3_server)
    grey = np.full((H, W, 3), GREY, np.uint8)
    out = shard_output(tmp_path, [samples.jpeg_bytes(grey)] * 3, two_objects, out="s3://preview/out", s3=s3)
    assert cli.main(["preview", out, "s3://preview/gallery", "--per-page", "2", "--s3-endpoint", s3_server]) == 0
    assert storage.list_names("s3://preview/gallery", s3) == ["index.html", "page-0002.html"]
    page = storage.read_bytes("s3://preview/gallery/index.html", s3).decode()
    assert page.count('class="card"') == 2 and page.count('class="mask"') == 4 and "data:image/jpeg;base64," in page


def test_report_page_shows_the_figures_with_units_and_the_plots(tmp_path, browser, capsys):
    out = shard_output(tmp_path, [samples.jpeg_bytes(np.full((H, W, 3), GREY, np.uint8))] * 3, two_objects)
    assert cli.main(["report", out]) == 0
    page = tmp_path / "out" / "_report" / "index.html"
    assert f"page: {page}" in capsys.readouterr().out
    dom = preview.dump_dom(str(page))
    figures = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]+)</td><td>[^<]*</td></tr>", dom))
    assert len(figures) > 0
    assert figures["images"] == "3" and figures["objects"] == "6" and figures["kept (passed the keep rule)"] == "3"
    funnel = re.search(r'<table class="funnel">(.*?)</table>', dom).group(1)
    assert re.findall(r"<tr>(.*?)</tr>", funnel) == [
        "<th>category</th><th>pairs</th><th>low_iou</th><th>kept</th>",
        "<td>single</td><td>6</td><td>3</td><td>3</td>", "<td>all</td><td>6</td><td>3</td><td>3</td>"]
    assert "objects (50.0% of verified)" in dom and "objects (2.00 per image)" in dom
    plots = re.findall(r'<img src="([^"]+\.png)"', dom)
    assert len(plots) == 4 and all((page.parent / p).is_file() for p in plots)
    shot = np.array(Image.open(preview.screenshot(str(page), str(tmp_path / "report.png"), (1100, 1400))).convert("RGB"))
    assert pixels_near(shot, np.array([31, 119, 180]), 6) > 5000  # matplotlib's bars: the plots are drawn on the page
