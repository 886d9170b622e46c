"""``report.html``: one self-contained page with before/after sliders, tables and the report's plots.

Everything is inside the file (images as data URIs, the style and the script inline), so it opens from disk, from
a mail attachment or an archive, without a server and without any network request.

Per group (a task of a report, or the one scene of ``tur compare``) the page shows a slider viewer: the left and the
right image (picked in the page among the *choices*: degraded, each run, clean) split by a line the pointer drags,
with zoom (wheel, +/-, 0) and pan (shift-drag or right-drag) shared by every viewer of the page, drawn
nearest-neighbour (``image-rendering: pixelated``) once zoomed in, and the PSNR/SSIM of every choice for the sample
shown. Keys: left/right arrows switch samples, up/down switch tasks, 1-9 put run N on the right (shift: on the
left), x swaps the sides.

Images: every pixel view is a lossless PNG (so what is compared when zoomed is what the model wrote); a picture
larger than the viewer also gets a JPEG preview drawn while it is shown at or below its own size, and the sample
strip uses small JPEG thumbnails. Identical images (a clean crop shared by several tasks) are stored once.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import cv2
import numpy as np

PathLike = Union[str, os.PathLike]

#: The viewer's drawing area in CSS pixels; pictures larger than this get a JPEG preview.
VIEW_W, VIEW_H = 720, 480
THUMB = 56
PREVIEW_QUALITY = 88


@dataclass
class Sample:
    """One scene: ``images`` maps each choice name to an (H, W, 3) float RGB array in [0, 1] (all the same size);
    ``metrics`` maps choice names to ``{"psnr": dB, "ssim": value}`` (choices without an entry show '-')."""

    name: str
    images: dict[str, np.ndarray]
    metrics: dict[str, dict] = field(default_factory=dict)


@dataclass
class Group:
    """The samples of one task (one viewer in the page)."""

    name: str
    samples: list[Sample]


# --- image encoding --------------------------------------------------------------------------------------------

def _to_bgr8(img: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name}: expected an (H, W, 3) RGB array, got "
                         f"{getattr(img, 'shape', type(img).__name__)}")
    if img.dtype == np.uint8:
        px = img
    else:
        px = np.round(np.clip(np.nan_to_num(img.astype(np.float32)), 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(px[:, :, ::-1])


def _data_uri(bgr: np.ndarray, ext: str, params: Sequence[int] = ()) -> str:
    ok, buf = cv2.imencode(ext, bgr, list(params))
    if not ok:
        raise ValueError(f"cannot encode a {bgr.shape} image as {ext}")
    mime = {".png": "image/png", ".jpg": "image/jpeg"}[ext]
    return f"data:{mime};base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _fit_within(bgr: np.ndarray, w: int, h: int) -> np.ndarray:
    scale = min(w / bgr.shape[1], h / bgr.shape[0], 1.0)
    if scale >= 1.0:
        return bgr
    size = (max(1, round(bgr.shape[1] * scale)), max(1, round(bgr.shape[0] * scale)))
    return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)


class _ImageTable:
    """Data URIs stored once each; the page refers to them by index."""

    def __init__(self) -> None:
        self.uris: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, uri: str) -> int:
        key = hashlib.sha1(uri.encode("ascii")).hexdigest()
        if key not in self._index:
            self._index[key] = len(self.uris)
            self.uris.append(uri)
        return self._index[key]

    def image(self, img: np.ndarray, name: str) -> dict:
        bgr = _to_bgr8(img, name)
        h, w = bgr.shape[:2]
        entry = {"png": self.add(_data_uri(bgr, ".png", (cv2.IMWRITE_PNG_COMPRESSION, 9))), "w": w, "h": h}
        if w > VIEW_W or h > VIEW_H:
            entry["preview"] = self.add(_data_uri(_fit_within(bgr, VIEW_W, VIEW_H), ".jpg",
                                                  (cv2.IMWRITE_JPEG_QUALITY, PREVIEW_QUALITY)))
        return entry

    def thumb(self, img: np.ndarray, name: str) -> int:
        bgr = _fit_within(_to_bgr8(img, name), THUMB, THUMB)
        return self.add(_data_uri(bgr, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 80)))


# --- page ------------------------------------------------------------------------------------------------------

def _finite_or_none(v) -> Optional[float]:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def page_data(groups: Sequence[Group], choices: Sequence[str], *, digit_choices: Optional[Sequence[str]] = None,
              left: Optional[str] = None, right: Optional[str] = None) -> dict:
    """The JSON the page's script reads: choices, the digit keys' choices, the images table and every sample."""
    choices = list(choices)
    if len(choices) < 2:
        raise ValueError(f"choices: expected at least two images to compare, got {choices}")
    table = _ImageTable()
    out_groups = []
    for g in groups:
        if not g.samples:
            raise ValueError(f"group {g.name!r}: no samples")
        samples = []
        for s in g.samples:
            missing = [c for c in choices if c not in s.images]
            if missing:
                raise ValueError(f"sample {s.name!r} of {g.name!r}: no image for {missing}")
            shapes = {c: s.images[c].shape[:2] for c in choices}
            if len(set(shapes.values())) != 1:
                raise ValueError(f"sample {s.name!r} of {g.name!r}: images differ in size {shapes}")
            samples.append({
                "name": s.name,
                "thumb": table.thumb(s.images[choices[0]], f"{g.name}/{s.name}/{choices[0]}"),
                "images": [table.image(s.images[c], f"{g.name}/{s.name}/{c}") for c in choices],
                "metrics": [{k: _finite_or_none(s.metrics.get(c, {}).get(k)) for k in ("psnr", "ssim")}
                            for c in choices],
            })
        out_groups.append({"name": g.name, "samples": samples})
    digits = [choices.index(c) for c in (digit_choices if digit_choices is not None else choices)][:9]
    li = choices.index(left) if left is not None else 0
    ri = choices.index(right) if right is not None else 1
    return {"choices": choices, "digits": digits, "left": li, "right": ri, "images": table.uris,
            "groups": out_groups, "view": [VIEW_W, VIEW_H]}


def markdown_to_html(md: str, figures: Optional[Mapping[str, str]] = None) -> str:
    """The subset of Markdown ``report.md`` uses: headings, pipe tables, images (``figures`` maps file names to
    data URIs), paragraphs with **bold** and _italics_."""
    figures = figures or {}
    out: list[str] = []
    lines = md.splitlines()
    i = 0

    def inline(text: str) -> str:
        t = html.escape(text.strip())
        t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
        return re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"<i>\1</i>", t)

    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, body = rows[0], rows[2:] if len(rows) > 1 and set("".join(rows[1])) <= set("-: ") else rows[1:]
            align = ["right" if c.strip().endswith(":") else "left" for c in rows[1]] if len(rows) > 1 else []
            cell = lambda tag, c, j: (f'<{tag} style="text-align:{align[j] if j < len(align) else "left"}">'
                                      f"{inline(c)}</{tag}>")
            out.append("<table class=\"md\"><thead><tr>" + "".join(cell("th", c, j) for j, c in enumerate(head))
                       + "</tr></thead><tbody>" + "".join("<tr>" + "".join(cell("td", c, j) for j, c in enumerate(r))
                                                          + "</tr>" for r in body) + "</tbody></table>")
            continue
        m = re.match(r"^(#{1,4}) (.*)$", line)
        img = re.match(r"^!\[(.*?)\]\((.*?)\)$", line.strip())
        if m:
            n = len(m.group(1))
            out.append(f"<h{n}>{inline(m.group(2))}</h{n}>")
        elif img:
            src = figures.get(img.group(2))
            if src is not None:
                out.append(f'<figure><img class="plot" src="{src}" alt="{html.escape(img.group(1))}"></figure>')
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    return "\n".join(out)


def build_page(title: str, data: Optional[dict], body_html: str = "", *, viewer_first: bool = True) -> str:
    """The whole HTML document: ``data`` from :func:`page_data` (None: no viewer) and other content."""
    viewer = ""
    if data is not None:
        payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
        viewer = (f'<section id="viewers"><div id="bar"></div><div id="groups"></div>'
                  f'<p class="help">Drag: move the split &middot; wheel or +/-: zoom, 0: fit &middot; shift-drag or '
                  f'right-drag: pan &middot; &larr;/&rarr;: sample, &uarr;/&darr;: task &middot; 1-9: run on the '
                  f'right (shift: on the left) &middot; x: swap sides</p></section>'
                  f'<script type="application/json" id="tur-data">{payload}</script>')
    parts = [viewer, body_html] if viewer_first else [body_html, viewer]
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body><h1>{html.escape(title)}</h1>\n"
            + "\n".join(parts) + f"\n<script>{_JS}</script>\n</body></html>\n")


def write_text_atomic(path: PathLike, text: str) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
    return p


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# --- report -----------------------------------------------------------------------------------------------------

def restore_samples(runs: Mapping[str, Path], *, per_task: Optional[int] = None,
                    device: str = "cpu") -> tuple[list[str], list[Group]]:
    """The held-out samples of every task restored by every run with a checkpoint (EMA weights), with per-sample
    PSNR/SSIM in each task's metric convention: ``(choices, groups)``, choices ``degraded, <runs...>, clean``.
    ``per_task``: at most this many samples of each task (default: all of the eval set)."""
    from . import data as tdata
    from . import metrics as M
    from .tasks import TaskSet
    from .train.checkpoint import build_model_from_checkpoint, find_checkpoint, load_checkpoint
    from .train.evaluate import restore, task_metric_settings
    from .train.trainer import TRAINER_DATA_KEYS

    models, ref_cfg, tasks = {}, None, None
    for name, run in runs.items():
        try:
            ckpt = load_checkpoint(find_checkpoint(run))
        except FileNotFoundError:
            continue
        models[name] = build_model_from_checkpoint(ckpt, use_ema=True).to(device).eval()
        if ref_cfg is None:
            ref_cfg, tasks = ckpt.get("config") or {}, TaskSet(list(ckpt["tasks"]))
    if not models:
        return [], []
    data_cfg = {k: v for k, v in (ref_cfg.get("data") or {}).items() if k not in TRAINER_DATA_KEYS}
    data_cfg.setdefault("seed", ref_cfg.get("seed", 0))
    eval_set = tdata.build_eval_dataset(data_cfg, tasks)
    settings = task_metric_settings(ref_cfg.get("train"), tasks)
    choices = ["degraded", *models, "clean"]
    by_task: dict[str, list[Sample]] = {}
    for i in range(len(eval_set)):
        task = eval_set.task_of(i)
        have = by_task.setdefault(task, [])
        if per_task is not None and len(have) >= per_task:
            continue
        item = eval_set[i]
        lq, gt = item["lq"].unsqueeze(0), item["gt"].unsqueeze(0)
        outs = {"degraded": lq[0]}
        for name, model in models.items():
            outs[name] = restore(model, lq.to(device)).cpu()[0]
        outs["clean"] = gt[0]
        spec = settings[task]
        kw = {"crop_border": spec["crop_border"], "test_y_channel": spec["test_y_channel"]}
        images = {c: t.permute(1, 2, 0).clamp(0, 1).numpy() for c, t in outs.items()}
        mets = {c: {"psnr": M.psnr(images[c], images["clean"], spec["convention"], **kw),
                    "ssim": M.ssim(images[c], images["clean"], spec["convention"], **kw)}
                for c in choices if c != "clean"}
        have.append(Sample(f"#{len(have) + 1}", images, mets))
    groups = [Group(t, by_task[t]) for t in tasks if by_task.get(t)]
    return choices, groups


#: Held-out samples per task in report.html: the demo's 4 crops each; a full test set would make a page of
#: hundreds of megabytes.
REPORT_SAMPLES_PER_TASK = 8


def write_html_report(folder: PathLike, runs: Mapping[str, Path], markdown: str, *, title: str,
                      samples: bool = True, per_task: Optional[int] = REPORT_SAMPLES_PER_TASK,
                      device: str = "cpu") -> Path:
    """``folder/report.html``: the viewers of the held-out samples (when ``samples`` and a run has a checkpoint;
    the first ``per_task`` of each task), then ``markdown`` (``report.md``'s text) with its PNG plots embedded.
    Returns the page's path."""
    folder = Path(folder)
    figures = {m: _png_uri(folder / m) for m in re.findall(r"!\[.*?\]\((.*?\.png)\)", markdown)
               if (folder / m).is_file() and m != "samples.png"}  # the viewers replace the static grid
    data = None
    if samples:
        choices, groups = restore_samples(runs, per_task=per_task, device=device)
        if groups:
            data = page_data(groups, choices, digit_choices=choices[1:-1], left="degraded", right=choices[1])
    body = markdown_to_html(re.sub(r"^# .*\n", "", markdown, count=1), figures)
    return write_text_atomic(folder / "report.html", build_page(title, data, body))


# --- tur compare ------------------------------------------------------------------------------------------------

def compare_images(paths: Sequence[PathLike], out: PathLike, *, names: Optional[Sequence[str]] = None,
                   ref: Optional[PathLike] = None, title: Optional[str] = None) -> Path:
    """A page comparing image files of one scene (e.g. the ``tur restore`` outputs of two models); with ``ref``
    (the clean image) each gets PSNR/SSIM against it and the reference is a choice too."""
    from . import metrics as M
    from .data.io import read_image

    paths = [Path(p) for p in paths]
    if len(paths) < 2 and ref is None:
        raise ValueError(f"images: expected at least two images to compare (or one and --ref), got {len(paths)}")
    if names is not None and len(names) != len(paths):
        raise ValueError(f"--names: expected {len(paths)} names (one per image), got {len(names)}")
    labels = list(names) if names is not None else _unique_labels(paths)
    images = {label: read_image(p) for label, p in zip(labels, paths)}
    metrics: dict[str, dict] = {}
    if ref is not None:
        ref_label = "reference" if "reference" not in images else f"reference ({Path(ref).name})"
        images[ref_label] = read_image(ref)
    shapes = {label: img.shape[:2] for label, img in images.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError("images: expected images of one size, got "
                         + ", ".join(f"{k} {v[1]}x{v[0]}" for k, v in shapes.items()))
    if ref is not None:
        for label in labels:
            metrics[label] = {"psnr": M.psnr(images[label], images[ref_label]),
                              "ssim": M.ssim(images[label], images[ref_label])}
    choices = list(images)
    sample = Sample(paths[0].name, images, metrics)
    data = page_data([Group("images", [sample])], choices, left=choices[0], right=choices[1])
    rows = "".join(f"<tr><td>{html.escape(label)}</td><td>{html.escape(str(p))}</td></tr>"
                   for label, p in zip(labels, paths))
    if ref is not None:
        rows += f"<tr><td>{html.escape(ref_label)}</td><td>{html.escape(str(ref))}</td></tr>"
    body = f'<h2>Files</h2><table class="md"><thead><tr><th>name</th><th>file</th></tr></thead><tbody>{rows}</tbody></table>'
    return write_text_atomic(out, build_page(title or "tur compare: " + ", ".join(labels), data, body))


def _unique_labels(paths: Sequence[Path]) -> list[str]:
    """File stems; the parent folder's name joins in where stems repeat (``tur/x.png`` vs ``l1/x.png``)."""
    stems = [p.stem for p in paths]
    labels = [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    return [f"{lab} ({i + 1})" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px auto;max-width:1100px;padding:0 12px;color:#222;background:#fff}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}h3{font-size:15px;margin:18px 0 6px}
table.md{border-collapse:collapse;margin:8px 0}table.md td,table.md th{border:1px solid #ccc;padding:3px 8px}
table.md th{background:#f3f3f3}
figure{margin:8px 0}img.plot{max-width:100%}
#bar{position:sticky;top:0;z-index:5;background:#fafafa;border:1px solid #ddd;padding:6px 8px;display:flex;
 gap:12px;align-items:center;flex-wrap:wrap}
#bar select,#bar button{font:inherit}
.viewer{position:relative;overflow:hidden;background:#333;cursor:ew-resize;user-select:none;touch-action:none;
 outline:none;border:2px solid transparent}
.viewer.active{border-color:#3b82f6}
.viewer .layer{position:absolute;left:0;top:0;width:100%;height:100%;overflow:hidden;pointer-events:none}
.viewer img{position:absolute;left:0;top:0;transform-origin:0 0;max-width:none;pointer-events:none}
.viewer.px img{image-rendering:pixelated}
.viewer .split{position:absolute;top:0;bottom:0;width:2px;margin-left:-1px;background:#fff;
 box-shadow:0 0 3px #000;pointer-events:none}
.viewer .lab{position:absolute;top:6px;padding:1px 6px;background:rgba(0,0,0,.6);color:#fff;font-size:12px;
 pointer-events:none}
.viewer .lab.l{left:6px}.viewer .lab.r{right:6px}
.row{display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap}
.strip{display:flex;gap:4px;margin:4px 0;flex-wrap:wrap}
.strip button{padding:0;border:2px solid transparent;background:none;cursor:pointer;line-height:0}
.strip button.on{border-color:#3b82f6}
table.mt{border-collapse:collapse;font-size:13px}table.mt td,table.mt th{padding:1px 8px;text-align:right}
table.mt td:first-child,table.mt th:first-child{text-align:left}
table.mt tr.L td{background:#fde7c7}table.mt tr.R td{background:#d6e6fd}
.help{color:#666;font-size:12px}
"""

_JS = r"""
(function () {
  "use strict";
  const el = document.getElementById("tur-data");
  if (!el) return;
  const D = JSON.parse(el.textContent);
  const [VW, VH] = D.view;
  const S = {left: D.left, right: D.right, zoom: 1, u: 0.5, v: 0.5, split: 0.5, active: 0,
             sample: D.groups.map(() => 0)};
  const views = [];
  const fmt = (x, d) => (x === null || x === undefined) ? "-" : x.toFixed(d);
  function opts(sel, value) {
    sel.innerHTML = "";
    D.choices.forEach((c, i) => { const o = document.createElement("option"); o.value = i; o.textContent = c;
      sel.appendChild(o); });
    sel.value = value;
  }
  // --- the bar: sides, zoom --------------------------------------------------------------------------------
  const bar = document.getElementById("bar");
  bar.innerHTML = '<label>left <select id="sel-left"></select></label>' +
    '<label>right <select id="sel-right"></select></label>' +
    '<button id="swap" title="x">swap</button>' +
    '<span>zoom <button id="zout">&minus;</button> <span id="zlab"></span> <button id="zin">+</button> ' +
    '<button id="zfit" title="0">fit</button></span>';
  const selL = document.getElementById("sel-left"), selR = document.getElementById("sel-right");
  opts(selL, S.left); opts(selR, S.right);
  selL.onchange = () => { S.left = +selL.value; render(); };
  selR.onchange = () => { S.right = +selR.value; render(); };
  document.getElementById("swap").onclick = swap;
  document.getElementById("zin").onclick = () => zoomBy(2, null);
  document.getElementById("zout").onclick = () => zoomBy(0.5, null);
  document.getElementById("zfit").onclick = () => { S.zoom = 1; S.u = S.v = 0.5; render(); };
  function swap() { [S.left, S.right] = [S.right, S.left]; render(); }

  // --- one viewer per group ------------------------------------------------------------------------------------
  const host = document.getElementById("groups");
  D.groups.forEach((g, gi) => {
    const sec = document.createElement("div");
    sec.className = "group";
    sec.innerHTML = (D.groups.length > 1 ? "<h3></h3>" : "") +
      '<div class="row"><div><div class="viewer" tabindex="0"><div class="layer lay-l"><img alt=""></div>' +
      '<div class="layer lay-r"><img alt=""></div><div class="split"></div>' +
      '<span class="lab l"></span><span class="lab r"></span></div><div class="strip"></div></div>' +
      '<table class="mt"><thead><tr><th></th><th>PSNR (dB)</th><th>SSIM</th></tr></thead>' +
      '<tbody></tbody></table></div>';
    if (D.groups.length > 1) sec.querySelector("h3").textContent = g.name;
    host.appendChild(sec);
    const v = sec.querySelector(".viewer");
    v.style.width = VW + "px"; v.style.height = VH + "px";
    v.dataset.group = gi;
    const strip = sec.querySelector(".strip");
    g.samples.forEach((s, si) => {
      const b = document.createElement("button");
      b.title = s.name;
      b.innerHTML = '<img alt="">';
      b.firstChild.src = D.images[s.thumb];
      b.onclick = () => { S.active = gi; S.sample[gi] = si; render(); };
      strip.appendChild(b);
    });
    const view = {gi, v, sec, imgL: sec.querySelector(".lay-l img"), imgR: sec.querySelector(".lay-r img"),
                  layR: sec.querySelector(".lay-r"), split: sec.querySelector(".split"),
                  labL: sec.querySelector(".lab.l"), labR: sec.querySelector(".lab.r"),
                  tbody: sec.querySelector("tbody"), strip};
    views.push(view);
    attach(view);
  });

  function sampleOf(view) { return D.groups[view.gi].samples[S.sample[view.gi]]; }
  function geom(view) {  // fit scale, scale, translation of the current sample's image in this viewer
    const im = sampleOf(view).images[0];
    const fit = Math.min(VW / im.w, VH / im.h);
    const s = fit * S.zoom;
    const cu = (im.w * s <= VW) ? 0.5 : Math.min(Math.max(S.u, VW / (2 * im.w * s)), 1 - VW / (2 * im.w * s));
    const cv = (im.h * s <= VH) ? 0.5 : Math.min(Math.max(S.v, VH / (2 * im.h * s)), 1 - VH / (2 * im.h * s));
    return {w: im.w, h: im.h, s, tx: VW / 2 - cu * im.w * s, ty: VH / 2 - cv * im.h * s};
  }
  function src(entry, s) {  // the JPEG preview while it holds every pixel shown, else the lossless PNG
    const p = Math.min(VW / entry.w, VH / entry.h);
    return D.images[(entry.preview !== undefined && s <= p * 1.0001) ? entry.preview : entry.png];
  }
  function place(img, entry, g) {
    const want = src(entry, g.s);
    if (img.getAttribute("src") !== want) img.setAttribute("src", want);
    img.style.width = g.w + "px"; img.style.height = g.h + "px";
    img.style.transform = "translate(" + g.tx + "px," + g.ty + "px) scale(" + g.s + ")";
  }
  function render() {
    selL.value = S.left; selR.value = S.right;
    let zl = "";
    views.forEach((view) => {
      const smp = sampleOf(view), g = geom(view);
      place(view.imgL, smp.images[S.left], g);
      place(view.imgR, smp.images[S.right], g);
      view.v.classList.toggle("px", g.s > 1.0001);
      view.v.classList.toggle("active", view.gi === S.active);
      const x = S.split * VW;
      view.layR.style.clipPath = "inset(0 0 0 " + x + "px)";
      view.split.style.left = x + "px";
      view.labL.textContent = D.choices[S.left]; view.labR.textContent = D.choices[S.right];
      view.v.dataset.sample = S.sample[view.gi]; view.v.dataset.left = S.left; view.v.dataset.right = S.right;
      view.v.dataset.scale = g.s.toFixed(4);
      Array.from(view.strip.children).forEach((b, i) => b.classList.toggle("on", i === S.sample[view.gi]));
      view.tbody.innerHTML = "";
      D.choices.forEach((c, i) => {
        const m = smp.metrics[i], tr = document.createElement("tr");
        if (i === S.left) tr.className = "L"; else if (i === S.right) tr.className = "R";
        tr.innerHTML = "<td></td><td>" + fmt(m.psnr, 2) + "</td><td>" + fmt(m.ssim, 4) + "</td>";
        tr.firstChild.textContent = c;
        view.tbody.appendChild(tr);
      });
      view.tbody.parentElement.querySelector("th").textContent = smp.name;
      if (view.gi === S.active) zl = (g.s >= 1 ? g.s.toFixed(g.s < 10 ? 1 : 0) : g.s.toFixed(2)) + "\u00d7";
    });
    document.getElementById("zlab").textContent = zl;
    document.body.dataset.turState = JSON.stringify(S);
  }
  function zoomBy(f, at) {  // at: {view, x, y} in viewer pixels, the image point kept under the pointer
    const view = at ? at.view : views[S.active];
    const g0 = geom(view);
    const z = Math.min(Math.max(S.zoom * f, 1), 256);
    if (z === S.zoom) return;
    const x = at ? at.x : VW / 2, y = at ? at.y : VH / 2;
    const px = (x - g0.tx) / g0.s, py = (y - g0.ty) / g0.s;
    S.zoom = z;
    const s1 = Math.min(VW / g0.w, VH / g0.h) * z;
    S.u = (px - (x - VW / 2) / s1) / g0.w;
    S.v = (py - (y - VH / 2) / s1) / g0.h;
    const g1 = geom(view);  // keep the clamped centre, so a later zoom-out starts from what is shown
    S.u = (VW / 2 - g1.tx) / (g1.w * g1.s); S.v = (VH / 2 - g1.ty) / (g1.h * g1.s);
    render();
  }
  function attach(view) {
    const v = view.v;
    let drag = null;
    const pos = (e) => { const r = v.getBoundingClientRect(); return {x: e.clientX - r.left - v.clientLeft,
                                                                        y: e.clientY - r.top - v.clientTop}; };
    v.addEventListener("contextmenu", (e) => e.preventDefault());
    v.addEventListener("pointerdown", (e) => {
      S.active = view.gi; v.focus({preventScroll: true});
      const p = pos(e);
      drag = {pan: e.shiftKey || e.button !== 0, x: p.x, y: p.y, g: geom(view)};
      v.setPointerCapture(e.pointerId);
      if (!drag.pan) S.split = Math.min(Math.max(p.x / VW, 0), 1);
      render();
      e.preventDefault();
    });
    v.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const p = pos(e);
      if (drag.pan) {
        const g = drag.g;
        S.u = (VW / 2 - g.tx - (p.x - drag.x)) / (g.w * g.s);
        S.v = (VH / 2 - g.ty - (p.y - drag.y)) / (g.h * g.s);
      } else {
        S.split = Math.min(Math.max(p.x / VW, 0), 1);
      }
      render();
    });
    const end = () => { drag = null; };
    v.addEventListener("pointerup", end);
    v.addEventListener("pointercancel", end);
    v.addEventListener("wheel", (e) => {
      e.preventDefault();
      S.active = view.gi;
      const p = pos(e);
      // One mouse-wheel notch (100 px) doubles or halves; a touchpad's small deltas zoom smoothly.
      const d = e.deltaMode === 1 ? e.deltaY * 33 : (e.deltaMode === 2 ? e.deltaY * 400 : e.deltaY);
      zoomBy(Math.pow(2, Math.max(-2, Math.min(2, -d / 100))), {view, x: p.x, y: p.y});
    }, {passive: false});
    v.addEventListener("dblclick", () => { S.zoom = 1; S.u = S.v = 0.5; render(); });
  }
  document.addEventListener("keydown", (e) => {
    if (e.target && (e.target.tagName === "SELECT" || e.target.tagName === "INPUT")) return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const gi = S.active, n = D.groups[gi].samples.length;
    let done = true;
    if (e.key === "ArrowRight") S.sample[gi] = (S.sample[gi] + 1) % n;
    else if (e.key === "ArrowLeft") S.sample[gi] = (S.sample[gi] + n - 1) % n;
    else if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      S.active = (gi + (e.key === "ArrowDown" ? 1 : D.groups.length - 1)) % D.groups.length;
      views[S.active].sec.scrollIntoView({block: "nearest"});
    }
    else if (/^Digit[1-9]$/.test(e.code)) {
      const k = +e.code.slice(5) - 1;
      if (k >= D.digits.length) return;
      if (e.shiftKey) S.left = D.digits[k]; else S.right = D.digits[k];
    }
    else if (e.key === "x") swap();
    else if (e.key === "+" || e.key === "=") zoomBy(2, null);
    else if (e.key === "-") zoomBy(0.5, null);
    else if (e.key === "0") { S.zoom = 1; S.u = S.v = 0.5; }
    else done = false;
    if (done) { e.preventDefault(); render(); }
  });
  render();
  window.turViewer = {state: S, data: D, render};
})();
"""
