"""`train.py evaluate --report DIR`: the HTML page, opened from disk in a real browser (Chromium,
driven by playwright), as a user opens it."""

import os
import re
import shutil

import pytest
import torch

import train
from checkpoint import load_model
from conftest import run
from data import load_pairs
from metrics import evaluate
from onnx_engine import engine_for
from report_html import gain_window

CHROMIUM = os.environ.get("SRCNN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(mini_root, tmp_path_factory):
    """A checkpoint with a history (one epoch on the tiny data root), and its report with the x8 column.
    Its folder's path is long whatever the temporary folder's (issue 60): the page must wrap it."""
    out = tmp_path_factory.mktemp("report")
    run_folder = out / ("a_checkpoint_folder_whose_name_is_longer_than_a_phone_screen_is_wide_" * 3) / "run"
    assert train.main(["train", "--num-epoch", "1", "--batch-size", "8", "--data-root", str(mini_root),
                       "--checkpoint-dir", str(run_folder)]) == 0  # in this process: no start-up of torch
    result = run("train.py", "evaluate", str(run_folder / "last.pth"), "--data-root", str(mini_root),
                 "--sets", "Set5", "--self-ensemble", "--report", str(out / "page"))
    assert result.returncode == 0, result.stderr
    return run_folder / "last.pth", out / "page", result.stdout


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or CHROMIUM is None:
        reason = "the browser test needs playwright (pip install playwright) and Chromium (apt-get install chromium)"
        if os.environ.get("SRCNN_REQUIRE_BROWSER"):  # CI: a missing browser is a failure, not a skip
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.mark.slow
def test_report_in_a_browser(report, browser, mini_root):
    checkpoint, folder, printed = report
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto((folder / "index.html").as_uri())
    page.wait_for_load_state("load")
    assert errors == []
    loaded = page.eval_on_selector_all("img", "images => images.map(i => i.complete && i.naturalWidth > 0)")
    assert len(loaded) == 2 * 7 + 1 and all(loaded)  # per image the slider's 2 and 5 crops; the training curve
    behind_the_slider = page.evaluate("""() => Promise.all([...document.querySelectorAll(".compare")]
        .flatMap(c => Object.values(c.dataset)).map(src => new Promise(done => {
            const image = new Image(); image.onload = () => done(image.naturalWidth > 0);
            image.onerror = () => done(false); image.src = src; })))""")
    assert len(behind_the_slider) == 2 * 4 and all(behind_the_slider)  # bicubic, SRCNN, x8, ground truth

    # the numbers: each image's scores as evaluate computes them, the means as `evaluate` printed them
    model = engine_for(load_model(checkpoint, torch.device("cpu"))[0])  # the engine `evaluate` scores with
    pairs = load_pairs(mini_root / "Set5", 3)
    expected = [evaluate(None, pairs, 3), evaluate(model, pairs, 3), evaluate(model, pairs, 3, self_ensemble=True)]
    rows = page.eval_on_selector_all("table.scores tbody tr",
                                     "rows => rows.map(r => [...r.cells].map(c => c.innerText))")
    for i, row in enumerate(rows):
        numbers = [f"{e['images'][i][m]:{f}}" for e in expected for m, f in (("psnr", ".2f"), ("ssim", ".4f"))]
        assert row[0] == pairs[i][0] and row[1:7] == numbers
    foot = page.inner_text("table.scores tfoot").split()
    printed_row = re.findall(r"\d+\.\d+", next(line for line in printed.splitlines() if line.startswith("Set5")))
    assert foot[3:9] == printed_row and printed_row[2] == f"{expected[1]['psnr']:.2f}"

    # sorting: by SRCNN PSNR, up, then down
    names = sorted(range(len(pairs)), key=lambda i: expected[1]["images"][i]["psnr"])
    header = page.locator("table.scores thead button", has_text="SRCNN PSNR").first
    for order in (names, names[::-1]):
        header.click()
        shown = page.eval_on_selector_all("table.scores tbody tr", "rows => rows.map(r => r.cells[0].innerText)")
        assert shown == [pairs[i][0] for i in order]

    # the slider: dragging it, dragging across the picture, the keyboard, and the choice of pictures
    compare = page.locator(".compare").first
    over = compare.locator(".over")
    assert over.evaluate("e => e.style.clipPath") == "inset(0px 50% 0px 0px)"
    track = compare.locator("input[type=range]").bounding_box()
    page.mouse.move(track["x"] + track["width"] / 2, track["y"] + track["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] * 0.2, track["y"] + track["height"] / 2, steps=5)
    page.mouse.up()
    dragged = float(compare.locator("input[type=range]").input_value())
    assert 10 < dragged < 30 and over.evaluate("e => e.style.clipPath") == f"inset(0px {100 - dragged:g}% 0px 0px)"
    stage = compare.locator(".stage").bounding_box()
    page.mouse.move(stage["x"] + stage["width"] * 0.1, stage["y"] + 5)
    page.mouse.down()
    page.mouse.move(stage["x"] + stage["width"] * 0.9, stage["y"] + 5, steps=5)
    page.mouse.up()
    assert float(compare.locator("input[type=range]").input_value()) > 80
    assert compare.locator(".split").evaluate("e => parseFloat(e.style.left)") > 80
    compare.locator("input[type=range]").focus()
    before = float(compare.locator("input[type=range]").input_value())
    page.keyboard.press("Home")
    assert float(compare.locator("input[type=range]").input_value()) == 0 < before
    compare.locator("select").select_option("srcnn|hr")
    assert over.evaluate("e => e.src").endswith("/srcnn.png") and compare.locator(".under").evaluate(
        "e => e.src").endswith("/hr.png")

    # the recipe: the recorded command; in a 1280x800 window every column in view, without scrolling;
    # and on a phone, nothing wider than the screen
    assert "train.py train --num-epoch 1" in page.inner_text("#recipe ~ ol")
    page.set_viewport_size({"width": 1280, "height": 800})
    assert page.evaluate("[...document.querySelectorAll('.scroll')].every(s => s.scrollWidth <= s.clientWidth)")
    edges = page.eval_on_selector_all("table.scores thead th",
                                      "cells => cells.map(c => c.getBoundingClientRect().right)")
    assert len(edges) == 9 and max(edges) <= page.evaluate("document.documentElement.clientWidth")
    page.set_viewport_size({"width": 380, "height": 700})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert errors == []


def test_gain_window_finds_the_improved_region():
    """The window lies where SRCNN's error drops most, on the LR grid and clear of the shaved border."""
    hr = torch.full((3, 90, 120), 128, dtype=torch.uint8)
    bicubic, srcnn = hr.clone(), hr.clone()
    bicubic[:, 30:60, 63:93] = 200  # bicubic is wrong here; SRCNN gets it right
    bicubic[:, :3, :] = 0  # a larger error inside the shaved border must not count
    top, left, size = gain_window(bicubic, srcnn, hr, 3)
    assert size == 30 and (top, left) == (30, 63)
    assert gain_window(bicubic, bicubic, hr, 3)[2] == 30  # no gain anywhere: still a valid window
