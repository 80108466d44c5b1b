"""`train.py evaluate --report DIR`: one HTML page that shows the results the way papers do.

Plain HTML with a little CSS and JavaScript, no framework and nothing from the network, so it
opens straight from disk. Per set, a table of every image's scores, sortable by any column. Per
image, a before/after slider, and zoomed crops of the window where SRCNN gains most over bicubic,
enlarged with nearest-neighbour so that pixels stay visible.
"""

import html
import re
from pathlib import Path
from urllib.parse import quote

import torch
import torch.nn.functional as F

from data import downscale, image_to_tensor, rgb_to_y, save_image, tensor_to_image
from files import atomic_write

CROP = 48  # side of the zoomed window in HR pixels (at most a third of the image's shorter side)
CROP_DISPLAY = 192  # about how wide each zoomed crop is drawn, in pixels
PROTOCOLS = {"pil": "Pillow's bicubic", "matlab": "MATLAB's bicubic imresize"}
LABELS = {"lr": "LR input", "bicubic": "bicubic", "srcnn": "SRCNN", "x8": "SRCNN x8", "hr": "ground truth"}

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; padding: 0 12px 48px; max-width: 1240px; color: #222; }
h1 { font-size: 1.5em; overflow-wrap: anywhere; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { margin-bottom: .3em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; text-align: right; border-bottom: 1px solid #eee; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { white-space: normal; vertical-align: bottom; }  /* "SRCNN x8 gain (dB)" may wrap; numbers never do */
thead button { font: inherit; font-weight: bold; border: 0; background: none; cursor: pointer; padding: 0; }
th[aria-sort=ascending] button::after { content: " \\25B2"; }
th[aria-sort=descending] button::after { content: " \\25BC"; }
tfoot td, tfoot th { font-weight: bold; border-top: 2px solid #999; }
.compare { width: fit-content; max-width: 100%; }
.stage { position: relative; margin: 6px 0; touch-action: none; cursor: ew-resize; user-select: none; }
.stage img { display: block; max-width: 100%; height: auto; }
.stage .over { position: absolute; top: 0; left: 0; }
.stage .split { position: absolute; top: 0; bottom: 0; width: 2px; background: #fff; box-shadow: 0 0 2px #000; }
.stage .window { position: absolute; border: 2px solid #ff0; box-shadow: 0 0 2px #000; pointer-events: none; }
.compare input[type=range] { display: block; width: 100%; margin: 0; }
.legend { display: flex; justify-content: space-between; font-size: .9em; color: #555; }
.crops { display: flex; flex-wrap: wrap; gap: 8px; margin: 8px 0 0; }
.crops figure { margin: 0; } .crops img { image-rendering: pixelated; max-width: 100%; }
figcaption { font-size: .85em; color: #555; }
code { overflow-wrap: anywhere; }
table.args td:last-child { white-space: normal; overflow-wrap: anywhere; text-align: left; }  /* long paths wrap */
"""

SCRIPT = """
for (const table of document.querySelectorAll("table.scores")) {
  const headers = [...table.tHead.rows[0].cells];
  headers.forEach((header, column) => header.querySelector("button").addEventListener("click", () => {
    const ascending = header.getAttribute("aria-sort") !== "ascending";
    headers.forEach(h => h.setAttribute("aria-sort", "none"));
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const key = row => row.cells[column].dataset.value;
    const numeric = column > 0;
    const rows = [...table.tBodies[0].rows].sort((a, b) =>
      (numeric ? key(a) - key(b) : key(a).localeCompare(key(b))) * (ascending ? 1 : -1));
    table.tBodies[0].append(...rows);
  }));
}
for (const compare of document.querySelectorAll(".compare")) {
  const [range, choice, stage] = ["input[type=range]", "select", ".stage"].map(s => compare.querySelector(s));
  const [under, over, split] = [".under", ".over", ".split"].map(s => stage.querySelector(s));
  const show = () => {
    over.style.clipPath = `inset(0 ${100 - range.value}% 0 0)`;
    split.style.left = `${range.value}%`;
  };
  const pick = () => {
    const [left, right] = choice.value.split("|");
    over.src = compare.dataset[left]; under.src = compare.dataset[right];
    const labels = compare.querySelectorAll(".legend span");
    labels[0].textContent = "\\u25C0 " + choice.selectedOptions[0].dataset.left;
    labels[1].textContent = choice.selectedOptions[0].dataset.right + " \\u25B6";
    range.setAttribute("aria-valuetext", `${choice.selectedOptions[0].text}: split at ${range.value}%`);
  };
  const drag = event => {
    if (event.type === "pointermove" && !event.buttons) return;
    const box = stage.getBoundingClientRect();
    range.value = Math.round(Math.min(Math.max((event.clientX - box.left) / box.width, 0), 1) * 1000) / 10;
    show(); pick();
  };
  stage.addEventListener("pointerdown", event => {
    event.preventDefault();  // no dragging of the picture itself
    stage.setPointerCapture(event.pointerId);
    drag(event);
  });
  stage.addEventListener("pointermove", drag);
  range.addEventListener("input", () => { show(); pick(); });
  choice.addEventListener("change", pick);
  show(); pick();
}
"""


def gain_window(bicubic: torch.Tensor, srcnn: torch.Tensor, hr: torch.Tensor, scale: int) -> tuple[int, int, int]:
    """(top, left, size) of the square where the squared Y error drops most from bicubic to SRCNN:
    on the LR grid (all three multiples of `scale`, so the LR input crops exactly) and clear of the
    border that the scores shave."""
    height, width = hr.shape[1:]
    size = max(scale, min(CROP, min(height, width) // 3) // scale * scale)
    bicubic_y, srcnn_y, hr_y = (rgb_to_y(t.float()) for t in (bicubic, srcnn, hr))
    drop = ((bicubic_y - hr_y) ** 2 - (srcnn_y - hr_y) ** 2)[None, None]
    border = torch.zeros_like(drop, dtype=torch.bool)
    border[..., :scale, :] = border[..., -scale:, :] = border[..., :scale] = border[..., -scale:] = True
    pooled = F.avg_pool2d(drop.masked_fill(border, 0), size, stride=scale)[0, 0]
    row, col = divmod(int(pooled.argmax()), pooled.shape[1])
    return row * scale, col * scale, size


def save_png(image: torch.Tensor, folder: Path, name: str, zoom: int = 1) -> str:
    """Write a uint8 3 x H x W tensor as folder/name (enlarged `zoom` times, nearest-neighbour);
    its link from the report's folder."""
    picture = tensor_to_image(image)
    if zoom > 1:
        picture = picture.resize((picture.width * zoom, picture.height * zoom), resample=0)  # 0: nearest
    save_image(picture, folder / name)
    return quote(f"{folder.parent.name}/{folder.name}/{name}")


def image_section(folder: Path, anchor: str, name: str, images: dict, scale: int, degradation: str) -> str:
    """The pictures of one image (its outputs as `images`: kind -> uint8 tensor) written into
    `folder`, and the page's section for it."""
    folder.mkdir(parents=True, exist_ok=True)
    top, left, size = gain_window(images["bicubic"], images["srcnn"], images["hr"], scale)
    zoom = max(1, CROP_DISPLAY // size)
    lr = image_to_tensor(downscale(tensor_to_image(images["hr"]), scale, degradation))
    crops = {"lr": save_png(lr[:, top // scale:(top + size) // scale, left // scale:(left + size) // scale],
                            folder, "crop_lr.png", zoom * scale)}
    links = {}
    for kind, image in images.items():
        links[kind] = save_png(image, folder, f"{kind}.png")
        crops[kind] = save_png(image[:, top:top + size, left:left + size], folder, f"crop_{kind}.png", zoom)
    height, width = images["hr"].shape[1:]
    pairs = [("bicubic", "srcnn"), ("srcnn", "hr")] + ([("srcnn", "x8"), ("x8", "hr")] if "x8" in images else [])
    options = "".join(f'<option value="{a}|{b}" data-left="{LABELS[a]}" data-right="{LABELS[b]}">'
                      f"{LABELS[a]} | {LABELS[b]}</option>" for a, b in pairs)
    data = " ".join(f'data-{kind}="{link}"' for kind, link in links.items())
    window = (f'left:{100 * left / width:.3f}%;top:{100 * top / height:.3f}%;'
              f'width:{100 * size / width:.3f}%;height:{100 * size / height:.3f}%')
    figures = "".join(f'<figure><img src="{link}" alt="{LABELS[kind]}, zoomed"><figcaption>{LABELS[kind]}</figcaption>'
                      "</figure>" for kind, link in crops.items())
    title = html.escape(name)
    return f"""
<article id="{anchor}"><h3>{title}</h3>
<div class="compare" {data}>
<label>compare <select>{options}</select></label>
<div class="stage"><img class="under" src="{links['srcnn']}" alt="{title}, right of the split" draggable="false"
 width="{width}" height="{height}"><img class="over" src="{links['bicubic']}" alt="{title}, left of the split"
 draggable="false" width="{width}" height="{height}"><div class="split"></div>
<div class="window" style="{window}"></div></div>
<input type="range" min="0" max="100" step="0.1" value="50" aria-label="{title}: where the split lies">
<div class="legend"><span></span><span></span></div>
</div>
<p>The {size}x{size} window (yellow) where SRCNN's squared error falls most below bicubic's, at x {left}, y {top},
enlarged {zoom}x with nearest-neighbour (the LR input {zoom * scale}x):</p>
<div class="crops">{figures}</div>
</article>"""


def score_table(set_name: str, scores: dict) -> str:
    """The set's table: one row per image, the set's means at the foot (as `evaluate` prints them)."""
    kinds = list(scores)  # bicubic, srcnn[, x8]
    head = ["image"] + [f"{LABELS[k]} {m}" for k in kinds for m in ("PSNR", "SSIM")]
    head += [f"{LABELS[k]} gain (dB)" for k in kinds[1:]]
    cells = "".join(f'<th scope="col" aria-sort="none"><button type="button">{h}</button></th>' for h in head)
    rows = []
    for i, image in enumerate(scores["bicubic"]["images"]):
        values = [(scores[k]["images"][i][m], fmt) for k in kinds for m, fmt in (("psnr", ".2f"), ("ssim", ".4f"))]
        values += [(scores[k]["images"][i]["psnr"] - image["psnr"], "+.2f") for k in kinds[1:]]
        name, anchor = html.escape(image["name"]), slug(f"{set_name}-{image['name']}")
        rows.append(f'<tr><td data-value="{name}"><a href="#{anchor}">{name}</a></td>'
                    + "".join(f'<td data-value="{v!r}">{v:{fmt}}</td>' for v, fmt in values) + "</tr>")
    means = [(scores[k][m], fmt) for k in kinds for m, fmt in (("psnr", ".2f"), ("ssim", ".4f"))]
    means += [(scores[k]["psnr"] - scores["bicubic"]["psnr"], "+.2f") for k in kinds[1:]]
    foot = f"<th>mean of {len(rows)}</th>" + "".join(f"<td>{v:{fmt}}</td>" for v, fmt in means)
    return (f'<div class="scroll"><table class="scores" data-set="{html.escape(set_name)}"><thead><tr>{cells}'
            f'</tr></thead><tbody>{"".join(rows)}</tbody><tfoot><tr>{foot}</tr></tfoot></table></div>')


def slug(text: str) -> str:
    """`text` fit for a file name and a link's #anchor."""
    return re.sub(r"[^\w.@-]", "_", text)


def recipe_section(summary: dict, curve: str | None) -> str:
    """The checkpoint's training arguments, recorded commands and (when it has a history) its curve."""
    args = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in sorted(summary["args"].items()))
    commands = "".join(f"<li>from epoch {run['epoch']}: <code>{html.escape(run['command'])}</code>"
                       + (f"<br>{html.escape(run['step'])}" if run.get("step") else "") + "</li>"
                       for run in summary["commands"])
    parts = ["<h2 id=recipe>Recipe</h2>"]
    if args:
        parts.append(f'<div class="scroll"><table class="args"><tbody>{args}</tbody></table></div>')
    parts.append(f"<ol>{commands}</ol>" if commands else "<p>No training commands are recorded.</p>")
    if curve:
        parts.append(f'<img src="{curve}" alt="training curves: loss and PSNR per epoch" style="max-width:100%">')
    return "\n".join(parts)


def write_report(folder: Path, summary: dict, degradation: str, pairs: dict, scores: dict,
                 curve: str | None) -> Path:
    """index.html and its pictures in `folder`. `pairs`: set -> (name, bicubic, HR) as load_pairs
    gives; `scores`: set -> kind (bicubic, srcnn[, x8]) -> evaluate's result with outputs kept."""
    index = folder / "index.html"
    text = page(folder, summary, degradation, pairs, scores, curve)
    with atomic_write(index, "report") as f:
        f.write(text.encode("utf-8"))
    return index


def page(folder: Path, summary: dict, degradation: str, pairs: dict, scores: dict, curve: str | None) -> str:
    """The whole page; every picture it shows is written into `folder` on the way."""
    scale = summary["scale"]
    sections = []
    for set_name, set_scores in scores.items():
        sections.append(f'<h2 id="{slug(set_name)}">{html.escape(set_name)}</h2>' + score_table(set_name, set_scores))
        for i, (name, _, hr) in enumerate(pairs[set_name]):
            images = {kind: result["images"][i]["output"] for kind, result in set_scores.items()} | {"hr": hr}
            sections.append(image_section(folder / slug(set_name) / f"{i:03d}", slug(f"{set_name}-{name}"), name,
                                          images, scale, degradation))
    nav = " · ".join(f'<a href="#{slug(s)}">{html.escape(s)}</a>' for s in scores)
    title = f"SRCNN x{scale}: {html.escape(summary['path'])}"
    epoch = "" if summary["epoch"] is None else f"Epoch {summary['epoch']}, "
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{STYLE}</style></head><body>
<h1>{title}</h1>
<p>{epoch}{summary['parameters']:,} parameters. Y-PSNR (dB) and SSIM with a {scale}-pixel border
shaved; inputs made with {PROTOCOLS[degradation]}. Click a column's name to sort by it; drag across a picture, or move
its slider, to move the split.</p>
<nav>{nav} · <a href="#recipe">recipe</a></nav>
{"".join(sections)}
{recipe_section(summary, curve)}
<script>{SCRIPT}</script>
</body></html>
"""
