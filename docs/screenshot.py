"""Take the README's picture of an `evaluate --report` page in Chromium, driven by playwright.

    python docs/screenshot.py docs/report.png
        the report of the shipped model on a drawn test chart (the data sets' pictures are not
        ours to publish, so the README shows this one)
    python train.py evaluate checkpoint.pth --sets Set5 --report pictures/report
    python docs/screenshot.py pictures/set5.png --page pictures/report/index.html
        any report, e.g. Set5's
"""

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]


def draw_chart(size: int = 360) -> Image.Image:
    """Text in several sizes, a fan of lines and rings on a colour gradient: where SRCNN's gain shows."""
    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    image = Image.merge("RGB", (image.getchannel(0), image.getchannel(0).rotate(90), Image.new("L", image.size, 160)))
    draw = ImageDraw.Draw(image)
    for i, height in enumerate((12, 16, 22, 30)):
        draw.text((12, 10 + sum((12, 16, 22, 30)[:i]) + 6 * i), "SRCNN x3 super-resolution", fill="black",
                  font=ImageFont.load_default(height))
    centre = (size * 3 // 4, size * 3 // 4)
    for angle in range(0, 180, 6):
        dx, dy = math.cos(math.radians(angle)) * size / 5, math.sin(math.radians(angle)) * size / 5
        draw.line((centre[0] - dx, centre[1] - dy, centre[0] + dx, centre[1] + dy), fill="white", width=1)
    for radius in range(6, size // 5, 8):
        draw.ellipse((size // 4 - radius, size * 3 // 4 - radius, size // 4 + radius, size * 3 // 4 + radius),
                     outline="navy", width=2)
    return image


def demo_report(folder: Path) -> Path:
    """The shipped model's report on the test chart, made by the command a user runs."""
    (folder / "data" / "Chart").mkdir(parents=True)
    draw_chart().save(folder / "data" / "Chart" / "chart.png")
    subprocess.run([sys.executable, "train.py", "evaluate", "checkpoint.pth", "--data-root", str(folder / "data"),
                    "--sets", "Chart", "--report", str(folder / "report")], check=True, cwd=ROOT)
    return folder / "report" / "index.html"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--page", type=Path, help="a report's index.html (default: the test chart's report)")
    parser.add_argument("--width", type=int, default=1000, help="browser window width in pixels")
    parser.add_argument("--height", type=int, default=1100, help="browser window height in pixels")
    args = parser.parse_args()
    chromium = os.environ.get("SRCNN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None or (args.page and not args.page.is_file()):
        print(f"error: not found: {args.page if chromium else 'Chromium (apt-get install chromium)'}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch, sync_playwright() as playwright:
        page_path = args.page or demo_report(Path(scratch))
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(page_path.resolve().as_uri())
        page.screenshot(path=args.out)
        browser.close()
    print(f"screenshot written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
