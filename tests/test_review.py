"""sculpt review: a stratified, seeded sample as Label Studio tasks; a real Label Studio server (1.23.2, in an
environment of its own: ``make install`` makes ``.venv/label-studio``) takes them, a scripted reviewer judges them,
its JSON export comes back through ``sculpt review import``, and ``sculpt review report`` gives the numbers
counted here by hand."""

import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sculpt import cli, schema
from sculpt.annotation import rle
from sculpt.outputs import review
from sculpt.testing import samples
from tests.test_cluster import free_port
from tests.test_export import gradient, mask_at, shard_output

H, W = 24, 32
IMAGES = 12
# per image: (box, iou, kept, category); kept as the verifier would: iou >= 0.5, but the 0.93 one lost to a rival
OBJECTS = [((1, 1, 9, 9), 0.95, True, "single"), ((10, 2, 20, 12), 0.78, True, "single"),
           ((0, 12, 32, 24), 0.62, True, "stuff"), ((22, 3, 30, 10), 0.41, False, "part"),
           ((4, 14, 12, 22), 0.12, False, "single"), ((14, 14, 20, 20), 0.93, False, "single")]


REASONS = "reject_reason" in schema.OBJECT_TYPE.names  # the checks are the reasons where the output has them


def make_objects():
    counter = itertools.count()

    def objects(h, w):
        i = next(counter)
        found = []
        for j, (box, iou, kept, category) in enumerate(OBJECTS):
            m = mask_at(*box, size=(h, w))
            iou = round((0.66 if j == 1 and i >= 9 else iou) - 0.005 * i, 3)  # a spread inside each band
            found.append({"reject_reason": None if kept else "rival" if j == 5 else "low_iou","phrase": f"thing {j}", "box": [float(v) for v in box], "mask": rle.encode(m),
                          "area": int(m.sum()), "iou": iou, "rival_iou": 0.9 if j == 5 else 0.1, "kept": kept,
                          "expression": f"object {j} of picture {i}", "expression_words": 5, "category": category})
        return found
    return objects


@pytest.fixture
def out(tmp_path):
    pictures = [samples.jpeg_bytes(np.roll(gradient(H, W), i, axis=1)) for i in range(IMAGES)]
    return shard_output(tmp_path, pictures, make_objects())


def test_allocation_is_equal_and_capped_at_each_stratum():
    assert review.allocate({"a": 2, "b": 50, "c": 50}, 30) == {"a": 2, "b": 14, "c": 14}
    assert review.allocate({"a": 2, "b": 50, "c": 50}, 31) == {"a": 2, "b": 15, "c": 14}
    assert review.allocate({"a": 2, "b": 3}, 30) == {"a": 2, "b": 3}
    assert [review.band(x) for x in (None, 0.0, 0.29, 0.3, 0.5, 0.849, 0.85, 1.0)] == \
        ["none", "0.00-0.30", "0.00-0.30", "0.30-0.50", "0.50-0.70", "0.70-0.85", "0.85-1.00", "0.85-1.00"]
    assert review.check({"kept": True}) == "kept" and review.check({"kept": False}) == "rejected"
    assert review.check({"kept": None}) == "unverified" and review.check({"kept": False, "reject_reason": "ambiguous"}) == "ambiguous"


def test_sample_is_stratified_seeded_nested_and_leads_back(out, tmp_path, capsys):
    from label_studio_sdk.converter import brush

    dest = tmp_path / "review"
    assert cli.main(["review", "sample", out, str(dest), "--n", "20", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "sampled 20 of 72 pairs in" in printed and '<Choices name="verdict"' in printed
    assert (dest / "labeling-config.xml").read_text() == review.LABELING_CONFIG
    tasks = json.loads((dest / "tasks.json").read_text())
    assert [t["data"]["pair"] for t in tasks] == list(range(1, 21))
    strata = {}
    for t in tasks:
        d = t["data"]
        strata.setdefault(d["stratum"], []).append(d)
        assert d["stratum"] == f"{d['check']}|{d['category']}|{d['band']}" and d["seed"] == 3
        assert d["check"] == ("kept" if d["kept"] else ("rival" if d["object"] == 5 else "low_iou") if REASONS else "rejected")
        assert d["iou"] == pytest.approx(OBJECTS[d["object"]][1] - 0.005 * d["index"], abs=1e-6) or d["object"] == 1
        assert d["image"] == f"/data/local-files/?d=images/{d['shard']}/{d['image_key']}.jpg"
        assert (dest / "images" / d["shard"] / f"{d['image_key']}.jpg").exists()
        assert d["expression"] == f"object {d['object']} of picture {d['index']}"
        box = OBJECTS[d["object"]][0]
        region = t["predictions"][0]["result"]
        assert len(region) == 1 and region[0]["value"]["brushlabels"] == ["pair"]
        decoded = brush.decode_rle(region[0]["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 0
        assert np.array_equal(decoded, mask_at(*box, size=(H, W)))
    # 7 strata: object 1 of the last 3 images is kept in a lower band; each other object is a stratum of 12 pairs
    assert sorted(ds[0]["stratum_size"] for ds in strata.values()) == [3, 9, 12, 12, 12, 12, 12]
    assert sorted(len(ds) for ds in strata.values()) == [2, 3, 3, 3, 3, 3, 3]
    assert all(ds[0]["stratum_sample"] == len(ds) for ds in strata.values())
    keys = lambda ts: {(t["data"]["shard"], t["data"]["index"], t["data"]["object"]) for t in ts}
    again = tmp_path / "again"
    assert cli.main(["review", "sample", out, str(again), "--n", "20", "--seed", "3"]) == 0
    assert json.loads((again / "tasks.json").read_text()) == tasks
    assert cli.main(["review", "sample", out, str(tmp_path / "more"), "--n", "27", "--seed", "3"]) == 0
    assert keys(tasks) < keys(json.loads((tmp_path / "more" / "tasks.json").read_text()))
    assert cli.main(["review", "sample", out, str(tmp_path / "other"), "--n", "20", "--seed", "4"]) == 0
    assert keys(tasks) != keys(json.loads((tmp_path / "other" / "tasks.json").read_text()))
    assert cli.main(["review", "sample", out, str(dest), "--n", "20"]) == 1
    assert "exists" in capsys.readouterr().err


# --- the numbers, counted by hand ----------------------------------------------------------------------------------

def by_hand(verdicts: dict, tasks: list[dict]):
    """(precision of kept, recall of good) as (p, low, high) from {pair number: accepted}: weights N_h / r_h,
    Wilson's interval at n_eff = (Σw)² / Σw²."""
    data = {t["data"]["pair"]: t["data"] for t in tasks}
    reviewed = {}
    for k in verdicts:
        reviewed[data[k]["stratum"]] = reviewed.get(data[k]["stratum"], 0) + 1
    weight = {k: data[k]["stratum_size"] / reviewed[data[k]["stratum"]] for k in verdicts}

    def share(pairs, hit):
        w = [weight[k] for k in pairs]
        p = sum(weight[k] for k in pairs if hit(k)) / sum(w)
        n = sum(w) ** 2 / sum(x * x for x in w)
        z = 1.959964
        mid, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return p, mid - half, mid + half

    kept = [k for k in verdicts if data[k]["kept"]]
    good = [k for k in verdicts if verdicts[k]]
    return share(kept, lambda k: verdicts[k]), share(good, lambda k: data[k]["kept"])


def printed_figure(text: str, what: str):
    line = next(line for line in text.splitlines() if line.startswith(what))
    return tuple(float(x) for x in re.search(r"([\d.]+) \[([\d.]+), ([\d.]+)\]", line).groups())


def judge(data: dict) -> bool:
    """The scripted reviewer: good when the verifier's IoU is high, bar a few."""
    return data["iou"] >= 0.6 and data["index"] % 4 != 1 or data["iou"] < 0.2 and data["index"] % 3 == 0


def test_import_replaces_verdicts_and_the_report_weighs_strata(out, tmp_path, capsys):
    dest = tmp_path / "review"
    assert cli.main(["review", "sample", out, str(dest), "--n", "24"]) == 0
    tasks = json.loads((dest / "tasks.json").read_text())
    verdicts = {t["data"]["pair"]: judge(t["data"]) for t in tasks[:-2]}  # the last two not reviewed

    def ls_export(verdicts, when):
        return [{"id": 100 + t["data"]["pair"], "data": t["data"], "annotations": [] if t["data"]["pair"] not in verdicts else [
            {"id": 1, "was_cancelled": True, "result": [], "updated_at": "2099"},  # skipped: no verdict
            {"id": 2, "completed_by": 7, "updated_at": when, "result": [
                {"from_name": "verdict", "to_name": "image", "type": "choices",
                 "value": {"choices": ["accept" if verdicts[t["data"]["pair"]] else "reject"]}}]}]} for t in tasks]

    path = tmp_path / "export.json"
    path.write_text(json.dumps(ls_export(verdicts, "2025-01-01T00:00:00Z")))
    assert cli.main(["review", "import", out, str(path)]) == 0
    assert "imported 22 verdicts (0 replacing" in capsys.readouterr().out
    assert cli.main(["review", "report", out]) == 0
    text = capsys.readouterr().out
    precision, recall = by_hand(verdicts, tasks)
    assert printed_figure(text, "precision of kept pairs") == pytest.approx(precision, abs=6e-4)
    assert printed_figure(text, "recall of good pairs") == pytest.approx(recall, abs=6e-4)
    flipped = {k: not v for k, v in list(verdicts.items())[:3]}
    path.write_text(json.dumps(ls_export(flipped, "2025-02-01T00:00:00Z")))
    assert cli.main(["review", "import", out, str(path)]) == 0
    assert "imported 3 verdicts (3 replacing earlier ones); 22 in" in capsys.readouterr().out
    rows = review.read_verdicts(out)
    assert {r["pair"]: r["good"] for r in rows} == {**verdicts, **flipped} and {r["annotator"] for r in rows} == {"7"}
    assert not any(name.endswith(".parquet") and name != f"{'sa_000000'}.parquet" for name in os.listdir(out))


# --- a real Label Studio ---------------------------------------------------------------------------------------------

LABEL_STUDIO = os.path.join(sys.prefix, "label-studio", "bin", "label-studio")  # make install: $(VENV)/label-studio


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """Label Studio 1.23.2 on 127.0.0.1 with a fresh database, local file serving from a document root of its own
    (the review folder goes there), and a user whose API token is set: yields (url, token, document root)."""
    import requests

    if not os.path.exists(LABEL_STUDIO):
        pytest.skip(f"no Label Studio at {LABEL_STUDIO}: `make install` makes it (python -m venv .venv/label-studio "
                    "&& .venv/label-studio/bin/pip install label-studio==1.23.2 'sentry-sdk<3')")
    root, data = tmp_path_factory.mktemp("ls-root"), tmp_path_factory.mktemp("ls-data")
    port, token = free_port(), "sculpt-review-test-token"
    env = {k: v for k, v in os.environ.items() if k != "HOST"}  # Label Studio reads HOST as its public URL
    env.update(LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true", LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(root),
               LABEL_STUDIO_USERNAME="reviewer@example.com", LABEL_STUDIO_PASSWORD="review-pass-1",
               LABEL_STUDIO_USER_TOKEN=token, LABEL_STUDIO_BASE_DATA_DIR=str(data), LATEST_VERSION_CHECK="false",
               SENTRY_DSN="", FRONTEND_SENTRY_DSN="", COLLECT_ANALYTICS="false")
    log = open(data / "server.log", "wb")
    server = subprocess.Popen([LABEL_STUDIO, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
                               "--host", f"http://127.0.0.1:{port}", "--data-dir", str(data), "--enable-legacy-api-token"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if server.poll() is not None:
                pytest.fail(f"Label Studio stopped at start ({server.returncode}):\n" + (data / "server.log").read_text()[-3000:])
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or too busy to answer in 2 s
                pass
            if time.monotonic() > deadline:
                pytest.fail("Label Studio did not answer in 240 s:\n" + (data / "server.log").read_text()[-3000:])
            time.sleep(1)
        yield url, token, root
    finally:
        with_group = os.getpgid(server.pid)
        os.killpg(with_group, signal.SIGTERM)  # the server and the workers it started, all in its own session
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(with_group, signal.SIGKILL)
            server.wait()
        log.close()


def test_a_review_round_trip_through_a_real_label_studio(label_studio, out, tmp_path, capsys):
    import requests

    url, token, root = label_studio
    api = requests.Session()
    api.headers["Authorization"] = f"Token {token}"
    # sculpt review sample into the document root's folder, as the README's recipe does
    assert cli.main(["review", "sample", out, str(root), "--n", "20"]) == 0
    config = (root / "labeling-config.xml").read_text()
    sampled = json.loads((root / "tasks.json").read_text())
    project = api.post(f"{url}/api/projects", json={"title": "sculpt review", "label_config": config})
    assert project.status_code == 201, project.text
    pid = project.json()["id"]
    at_root = api.post(f"{url}/api/storages/localfiles", json={"project": pid, "title": "x", "path": str(root)})
    assert at_root.status_code == 400 and "cannot be the same as" in at_root.text  # the root is the folder above images
    storage = api.post(f"{url}/api/storages/localfiles", json={"project": pid, "title": "sculpt images",
                                                               "path": str(root / "images"), "use_blob_urls": True})
    assert storage.status_code == 201, storage.text
    with open(root / "tasks.json", "rb") as f:
        imported = api.post(f"{url}/api/projects/{pid}/import", files={"file": ("tasks.json", f, "application/json")})
    assert imported.status_code == 201 and imported.json()["task_count"] == 20, imported.text
    assert imported.json()["prediction_count"] == 20 and api.get(f"{url}/api/projects/{pid}").json()["model_version"] == "sculpt"
    tasks = api.get(f"{url}/api/tasks", params={"project": pid, "page_size": 100}).json()["tasks"]
    assert sorted(t["data"]["pair"] for t in tasks) == list(range(1, 21))
    for t in tasks[:3]:  # the images come through the Local Storage, as a reviewer's browser asks for them
        image = api.get(url + t["data"]["image"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert image.content == (root / "images" / t["data"]["shard"] / f"{t['data']['image_key']}.jpg").read_bytes()
    assert requests.get(url + tasks[0]["data"]["image"]).status_code in (401, 403)  # and to a logged-in user only

    def submit(t, accept, fixed=None):
        """What the labeling UI posts: the prediction's region, the choice, the text when written."""
        region = api.get(f"{url}/api/predictions", params={"task": t["id"]}).json()[0]["result"]
        result = region + [{"from_name": "verdict", "to_name": "image", "type": "choices",
                            "value": {"choices": ["accept" if accept else "reject"]}}]
        if fixed:
            result.append({"from_name": "fixed", "to_name": "image", "type": "textarea", "value": {"text": [fixed]}})
        made = api.post(f"{url}/api/tasks/{t['id']}/annotations", json={"result": result})
        assert made.status_code == 201, made.text
        return made.json()["id"]

    by_pair = {t["data"]["pair"]: t for t in tasks}
    verdicts = {}
    for k, t in sorted(by_pair.items()):
        if k in (19, 20):
            continue  # not reviewed
        if k == 18:  # skipped: a cancelled annotation has no verdict
            assert api.post(f"{url}/api/tasks/{t['id']}/annotations", json={"result": [], "was_cancelled": True}).status_code == 201
            continue
        verdicts[k] = judge(t["data"])
        annotation = submit(t, verdicts[k], fixed="the orange patch" if k == 2 else None)
        if k == 3:  # changes their mind: the annotation updated
            verdicts[k] = not verdicts[k]
            changed = api.patch(f"{url}/api/annotations/{annotation}", json={"result": [
                {"from_name": "verdict", "to_name": "image", "type": "choices",
                 "value": {"choices": ["accept" if verdicts[k] else "reject"]}}]})
            assert changed.status_code == 200, changed.text
    assert {True, False} <= set(verdicts.values())

    def export(name, kind="JSON"):
        got = api.get(f"{url}/api/projects/{pid}/export", params={"exportType": kind})
        assert got.status_code == 200, got.text
        (tmp_path / name).write_bytes(got.content)
        return str(tmp_path / name)

    capsys.readouterr()
    assert cli.main(["review", "import", out, export("export.json")]) == 0
    assert "imported 17 verdicts (0 replacing earlier ones); 17 in" in capsys.readouterr().out
    rows = {r["pair"]: r for r in review.read_verdicts(out)}
    assert {k: r["good"] for k, r in rows.items()} == verdicts
    assert rows[2]["fixed_expression"] == "the orange patch" and sum(bool(r["fixed_expression"]) for r in rows.values()) == 1
    assert all((r["shard"], r["index"], r["object"]) == (by_pair[k]["data"]["shard"], by_pair[k]["data"]["index"],
                                                         by_pair[k]["data"]["object"]) for k, r in rows.items())

    def reported(verdicts):
        assert cli.main(["review", "report", out, "--target", "0.9"]) == 0
        text = capsys.readouterr().out
        precision, recall = by_hand(verdicts, sampled)
        assert printed_figure(text, "precision of kept pairs") == pytest.approx(precision, abs=6e-4)
        assert printed_figure(text, "recall of good pairs") == pytest.approx(recall, abs=6e-4)
        return text

    text = reported(verdicts)
    assert "by check" in text and "IoU threshold for precision 0.90" in text
    # a second pass: two verdicts changed in Label Studio; importing again replaces the pairs' verdicts
    for k in (4, 5):
        verdicts[k] = not verdicts[k]
        annotation = by_pair[k]["id"]
        latest = api.get(f"{url}/api/tasks/{annotation}/annotations").json()[-1]["id"]
        assert api.patch(f"{url}/api/annotations/{latest}", json={"result": [
            {"from_name": "verdict", "to_name": "image", "type": "choices",
             "value": {"choices": ["accept" if verdicts[k] else "reject"]}}]}).status_code == 200
    assert cli.main(["review", "import", out, export("again.json", "JSON_MIN")]) == 0
    assert "imported 17 verdicts (17 replacing earlier ones); 17 in" in capsys.readouterr().out
    rows = {r["pair"]: r for r in review.read_verdicts(out)}
    assert {k: r["good"] for k, r in rows.items()} == verdicts and rows[2]["fixed_expression"] == "the orange patch"
    reported(verdicts)
