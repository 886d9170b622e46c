"""report.html and `tur compare`: the page's content, and its behaviour in a real headless Chromium.

The browser tests drive Debian's ``chromium`` through the DevTools protocol (tests/cdp.py, stdlib only) and skip
with a message when it is missing (install it with ``apt-get install -y --no-install-recommends chromium``).
"""
import base64
import json
import os
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from tur_ext import metrics as M
from tur_ext.cli import main
from tur_ext.data.io import read_image, write_image
from tur_ext.report_html import Group, Sample, build_page, markdown_to_html, page_data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cdp import Browser, find_chromium  # noqa: E402

TASKS = ["denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"]
TINY = {
    "name": "html", "tasks": "3task", "seed": 0,
    "model": {"name": "nafnet-tiny", "width": 8},
    "loss": {"name": "tur"},
    "data": {"type": "embedded", "patch_size": 16, "length": 10, "eval_crop": 24, "eval_crops_per_task": 2,
             "batch_size": 5, "eval_batch_size": 5},
    "train": {"steps": 2, "log_every": 1, "checkpoint_every": 2, "progress": False, "tensorboard": False},
}


def _page_json(path: Path) -> dict:
    m = re.search(r'<script type="application/json" id="tur-data">(.*?)</script>', path.read_text(), re.S)
    assert m, f"{path}: no viewer data"
    return json.loads(m.group(1).replace("<\\/", "</"))


def _decode(uri: str) -> np.ndarray:
    head, b64 = uri.split(",", 1)
    assert head in ("data:image/png;base64", "data:image/jpeg;base64")
    bgr = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)
    return bgr[:, :, ::-1].astype(np.float32) / 255.0


def _assert_self_contained(html: str) -> None:
    # No fetchable reference at all: every src/href is a data URI or an in-page anchor.
    for attr in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html):
        assert attr.startswith("data:") or attr.startswith("#"), attr[:80]
    assert "<link" not in html and "@import" not in html and "url(" not in html
    assert not re.search(r"https?://", html)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 256x256 crop of scikit-image's astronaut: clean, noisy (busy texture) and blurred (smooth)."""
    skdata = pytest.importorskip("skimage.data")
    d = tmp_path_factory.mktemp("scene")
    clean = skdata.astronaut()[40:296, 140:396].astype(np.float32) / 255.0
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0, 0.12, clean.shape), 0, 1).astype(np.float32)
    blurred = cv2.GaussianBlur(clean, (9, 9), 3.0)
    paths = {}
    for name, img in (("clean", clean), ("noisy", noisy), ("blurred", blurred)):
        paths[name] = d / f"{name}.png"
        write_image(paths[name], img)
    return paths


@pytest.fixture(scope="module")
def compare_page(scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "page.html"
    assert main(["compare", str(scene["noisy"]), str(scene["blurred"]), "--ref", str(scene["clean"]),
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """Two 2-step runs (TUR and L1) of a tiny nafnet: a folder like the demo's, 2 held-out crops per task."""
    root = tmp_path_factory.mktemp("runs")
    for loss in ("tur", "l1"):
        cfg = dict(TINY, name=f"html-{loss}", loss={"name": loss}, output_dir=str(root / loss))
        p = root / f"{loss}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        assert main(["train", str(p)]) == 0
    assert main(["report", str(root), "--html"]) == 0
    return root


# --- content ------------------------------------------------------------------------------------------------------

def test_markdown_subset_to_html():
    md = ("## Results\n\n| task | a PSNR |\n|---|---:|\n| noise | 30.12 |\n| **mean** | **30.12** |\n\n"
          "_no validation results_\n\n![Curves](curves.png)\n![Missing](gone.png)\n")
    out = markdown_to_html(md, {"curves.png": "data:image/png;base64,AAAA"})
    assert "<h2>Results</h2>" in out
    assert '<th style="text-align:left">task</th><th style="text-align:right">a PSNR</th>' in out
    assert '<td style="text-align:right">30.12</td>' in out and "<b>mean</b>" in out
    assert "<i>no validation results</i>" in out
    assert '<img class="plot" src="data:image/png;base64,AAAA" alt="Curves">' in out and "gone.png" not in out
    assert "<td" in markdown_to_html("| <x> |\n|---|\n| a&b |") and "&lt;x&gt;" in markdown_to_html("| <x> |\n|--|")


def test_page_without_samples_has_no_viewer():
    html = build_page("A <report>", None, "<p>body</p>")
    assert 'id="tur-data"' not in html and "<p>body</p>" in html and "<title>A &lt;report&gt;</title>" in html
    _assert_self_contained(html)


def test_page_data_rejects_bad_samples():
    a, b = np.random.default_rng(1).random((2, 8, 10, 3), dtype=np.float32)
    ok = page_data([Group("t", [Sample("s", {"x": a, "y": b})])], ["x", "y"])
    assert ok["left"] == 0 and ok["right"] == 1 and len(ok["images"]) == 3  # two PNGs and the thumbnail
    with pytest.raises(ValueError, match=r"sample 's' of 't': images differ in size"):
        page_data([Group("t", [Sample("s", {"x": a, "y": b[:, :9]})])], ["x", "y"])
    with pytest.raises(ValueError, match=r"no image for \['z'\]"):
        page_data([Group("t", [Sample("s", {"x": a, "y": b})])], ["x", "y", "z"])
    with pytest.raises(ValueError, match="choices: expected at least two"):
        page_data([Group("t", [Sample("s", {"x": a})])], ["x"])
    # Identical pictures are stored once: the second sample adds nothing new.
    twice = page_data([Group("t", [Sample("s", {"x": a, "y": b}), Sample("r", {"x": a, "y": b})])], ["x", "y"])
    assert len(twice["images"]) == 3


def test_compare_page_is_self_contained_with_metrics(scene, compare_page):
    html = compare_page.read_text()
    _assert_self_contained(html)
    data = _page_json(compare_page)
    assert data["choices"] == ["noisy", "blurred", "reference"]
    smp = data["groups"][0]["samples"][0]
    clean = read_image(scene["clean"])
    for i, name in enumerate(("noisy", "blurred")):
        img = read_image(scene[name])
        assert smp["metrics"][i]["psnr"] == pytest.approx(M.psnr(img, clean), abs=1e-9)
        assert smp["metrics"][i]["ssim"] == pytest.approx(M.ssim(img, clean), abs=1e-9)
        # The pixel view is lossless: the embedded PNG is the file's pixels.
        entry = smp["images"][i]
        assert (entry["w"], entry["h"]) == (256, 256) and "preview" not in entry
        np.testing.assert_array_equal(_decode(data["images"][entry["png"]]), img)
    assert smp["metrics"][2] == {"psnr": None, "ssim": None}


def test_compare_errors(scene, tmp_path, capsys):
    small = tmp_path / "small.png"
    write_image(small, np.random.default_rng(2).random((20, 30, 3), dtype=np.float32))
    assert main(["compare", str(scene["noisy"]), str(small), "--out", str(tmp_path / "p.html")]) == 1
    assert "images: expected images of one size, got noisy 256x256, small 30x20" in capsys.readouterr().err
    assert main(["compare", str(scene["noisy"]), str(scene["clean"]), "--names", "a", "--out",
                 str(tmp_path / "p.html")]) == 1
    assert "--names: expected 2 names" in capsys.readouterr().err
    assert main(["compare", str(scene["noisy"]), "--out", str(tmp_path / "p.html")]) == 1
    assert "expected at least two images" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nope.png"), str(scene["noisy"]), "--out", str(tmp_path / "p.html")]) == 1
    assert "nope.png" in capsys.readouterr().err and not (tmp_path / "p.html").exists()


def test_large_pictures_get_a_jpeg_preview(tmp_path):
    yy, xx = np.mgrid[0:500, 0:760].astype(np.float32)
    big = np.stack([xx / 760, yy / 500, (xx + yy) % 37 / 37], axis=-1)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    write_image(a, big)
    write_image(b, big[:, ::-1])
    out = tmp_path / "page.html"
    assert main(["compare", str(a), str(b), "--names", "left,right", "--out", str(out)]) == 0
    data = _page_json(out)
    assert data["choices"] == ["left", "right"]
    entry = data["groups"][0]["samples"][0]["images"][0]
    prev = _decode(data["images"][entry["preview"]])
    assert prev.shape == (474, 720, 3)  # fitted into the 720x480 viewer
    assert data["images"][entry["png"]].startswith("data:image/png")


def test_report_html_from_runs(runs_dir):
    html_path = runs_dir / "report.html"
    html = html_path.read_text()
    _assert_self_contained(html)
    assert (runs_dir / "report.md").is_file()
    # The report's own tables and plots (samples.png is replaced by the viewers).
    assert "<th style=\"text-align:right\">tur PSNR</th>" in html and "<td style=\"text-align:left\">dehaze</td>" in html
    assert html.count('<img class="plot" src="data:image/png;base64,') == 3
    data = _page_json(html_path)
    assert data["choices"] == ["degraded", "tur", "l1", "clean"]
    assert data["digits"] == [1, 2] and (data["left"], data["right"]) == (0, 1)
    assert [g["name"] for g in data["groups"]] == TASKS
    for g in data["groups"]:
        assert len(g["samples"]) == 2
        for s in g["samples"]:
            imgs = [_decode(data["images"][e["png"]]) for e in s["images"]]
            assert all(im.shape == (24, 24, 3) for im in imgs)
            # Per-sample PSNR/SSIM of each choice against the clean crop, as the page shows them.
            for i in range(3):
                assert s["metrics"][i]["psnr"] == pytest.approx(M.psnr(imgs[i], imgs[3]), abs=0.05)
                assert s["metrics"][i]["ssim"] == pytest.approx(M.ssim(imgs[i], imgs[3]), abs=0.01)
            assert s["metrics"][3] == {"psnr": None, "ssim": None}
    # The two samples of a task differ, and the runs' restorations differ from the degraded input.
    s0, s1 = data["groups"][0]["samples"]
    assert s0["images"][0]["png"] != s1["images"][0]["png"]
    assert s0["images"][1]["png"] != s0["images"][0]["png"]


# --- in a browser -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    exe = find_chromium()
    if exe is None:
        msg = "chromium not found: apt-get install -y --no-install-recommends chromium (or set $CHROMIUM)"
        if os.environ.get("TUR_REQUIRE_BROWSER") == "1":  # CI installs it: a missing browser is a failure there
            pytest.fail(msg)
        pytest.skip(msg)
    with Browser(exe, width=1000, height=800) as b:
        yield b


def _shot(browser) -> np.ndarray:
    # Data-URI pictures decode asynchronously: wait for every one before the screenshot.
    browser.eval("Promise.all(Array.from(document.images).map(i => i.decode().catch(() => 0))).then(() => 1)")
    img = cv2.imdecode(np.frombuffer(browser.screenshot(), np.uint8), cv2.IMREAD_COLOR)
    return img.astype(np.float32)


def _viewer_origin(browser, index: int = 0) -> tuple[float, float]:
    return tuple(browser.eval(f"(() => {{ const v = document.querySelectorAll('.viewer')[{index}]; "
                              "const r = v.getBoundingClientRect(); return [r.left + v.clientLeft, "
                              "r.top + v.clientTop]; })()"))


def _state(browser) -> dict:
    return json.loads(browser.eval("document.body.dataset.turState"))


def _texture(shot: np.ndarray, x0: int, x1: int, y0: int, y1: int) -> float:
    """Mean absolute difference of horizontally neighbouring pixels: high for the noisy image, low for the blur."""
    patch = shot[y0:y1, x0:x1]
    return float(np.abs(np.diff(patch, axis=1)).mean())


def _only_local_requests(browser, page: Path) -> None:
    urls = browser.network_urls()
    assert page.as_uri() in urls
    assert [u for u in urls if not u.startswith("data:") and u != page.as_uri()] == []


def test_compare_page_slider_zoom_in_chromium(browser, compare_page):
    browser.events.clear()
    browser.open(compare_page.as_uri())
    ox, oy = _viewer_origin(browser)
    shot = _shot(browser)
    assert shot.std() > 20, "blank screenshot"
    # 256 px image fitted into the 720x480 viewer: 480x480 from x=120, the split at x=360.
    ix0, iy0 = int(ox) + 120, int(oy)
    y0, y1 = iy0 + 40, iy0 + 440
    left, right = _texture(shot, ix0 + 10, ix0 + 230, y0, y1), _texture(shot, ix0 + 250, ix0 + 470, y0, y1)
    assert left > 3 * right, (left, right)  # noisy on the left of the split, blurred on its right
    assert browser.eval("document.querySelector('.lab.l').textContent") == "noisy"

    browser.drag(ox + 360, oy + 200, ox + 180, oy + 200)
    assert _state(browser)["split"] == pytest.approx(0.25, abs=0.01)
    moved = _shot(browser)
    diff = np.abs(moved - shot).max(axis=(0, 2))  # per screen column
    xs = int(ox)
    assert (diff[xs + 190:xs + 350] > 0).mean() > 0.95  # the band the split crossed changed
    assert diff[xs + 125:xs + 175].max() == 0 and diff[xs + 370:xs + 595].max() == 0
    assert _texture(moved, xs + 190, xs + 350, y0, y1) < left / 3  # that band now shows the blurred image

    # Wheel: 2x zoom kept under the pointer, drawn nearest-neighbour.
    browser.mouse("mouseWheel", ox + 360, oy + 240, buttons=0, button="none", deltaX=0, deltaY=-100)
    st = _state(browser)
    assert st["zoom"] == 2 and browser.eval("document.querySelector('.viewer').dataset.scale") == "3.7500"
    assert browser.eval("getComputedStyle(document.querySelector('.viewer img')).imageRendering") == "pixelated"
    # Pan with the right button: the centre moves by the drag over the scale.
    u0 = st["u"]
    browser.mouse("mouseMoved", ox + 500, oy + 240, buttons=0, button="none")
    browser.mouse("mousePressed", ox + 500, oy + 240, buttons=2, button="right")
    browser.mouse("mouseMoved", ox + 425, oy + 240, buttons=2, button="right")
    browser.mouse("mouseReleased", ox + 425, oy + 240, buttons=0, button="right")
    st = _state(browser)
    assert st["u"] == pytest.approx(u0 + 75 / (256 * 3.75), abs=1e-6) and st["split"] == pytest.approx(0.25, abs=0.01)
    browser.key("x")
    assert (_state(browser)["left"], _state(browser)["right"]) == (1, 0)
    assert browser.console_errors() == []
    _only_local_requests(browser, compare_page)


def test_report_page_keys_in_chromium(browser, runs_dir):
    page = runs_dir / "report.html"
    browser.events.clear()
    browser.open(page.as_uri())
    ox, oy = _viewer_origin(browser)
    shot = _shot(browser)
    assert shot.std() > 20, "blank screenshot"
    vx, vy = int(ox), int(oy)
    region = lambda s: s[vy:vy + 480, vx:vx + 720]  # noqa: E731
    assert region(shot).std() > 5, "the first viewer shows no picture"
    assert _state(browser)["sample"][0] == 0

    browser.key("ArrowRight")
    assert _state(browser)["sample"][0] == 1
    after = _shot(browser)
    assert np.abs(region(after) - region(shot)).max() > 0 and region(after).std() > 5  # another sample is drawn
    assert browser.eval("document.querySelector('.viewer').dataset.sample") == "1"
    browser.key("ArrowRight")
    assert _state(browser)["sample"][0] == 0  # wraps around

    browser.key("2")
    assert _state(browser)["right"] == 2
    assert browser.eval("document.querySelector('.lab.r').textContent") == "l1"
    assert browser.eval("document.querySelector('tr.R td').textContent") == "l1"
    browser.key("9")  # no ninth run: nothing changes
    assert _state(browser)["right"] == 2
    browser.key("1")
    assert browser.eval("document.querySelector('.lab.r').textContent") == "tur"

    browser.key("ArrowDown")
    assert _state(browser)["active"] == 1
    browser.key("ArrowRight")
    assert _state(browser)["sample"] == [0, 1, 0, 0, 0]
    # Zoom is shared by every viewer.
    browser.key("+")
    scales = browser.eval("Array.from(document.querySelectorAll('.viewer')).map(v => v.dataset.scale)")
    assert len(scales) == 5 and len(set(scales)) == 1 and float(scales[0]) == pytest.approx(2 * 20.0)
    assert browser.console_errors() == []
    _only_local_requests(browser, page)
