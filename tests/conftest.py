"""Shared fixtures: the real data sets (found or fetched as a user would), small generated data sets,
a CLI runner."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from download import default_data_root, download
from utils import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SRCNN_SHARED_DATA", ROOT.parent / "shared" / "data"))
REAL_SETS = ("T91", "Set5", "Set14", "BSD100")


def run(script: str, *args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run one of the project's CLIs in a fresh Python process, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=kwargs.pop("cwd", ROOT), **kwargs,
    )


@pytest.fixture()
def cli(capsys):
    """Run a CLI's main() in this process (no torch import per call): returns what a run returns."""

    def call(module: str, *args: str) -> subprocess.CompletedProcess:
        main = importlib.import_module(module).main
        capsys.readouterr()
        try:
            run_cli(lambda: main(list(args)))
        except SystemExit as done:
            code = done.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([module, *args], code, out, err)

    return call


def assert_clean_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """A user error: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), result.stderr
    for word in words:
        assert word.lower() in result.stderr.lower(), result.stderr


def find_real_data(shared: Path, data_root: Path, base_url: str | None, sets=REAL_SETS) -> Path:
    """The folder the tests read the real data sets from: `shared` when it holds them all, else the
    data root, where the project's own checksummed download completes whatever is missing."""
    if all((shared / name).is_dir() for name in sets):
        return shared
    try:
        download(data_root, list(sets), base_url)
        return data_root
    except UserError as err:
        why = str(err)
    # outside the except block, so that pytest shows this one line and not the exception it replaces
    pytest.fail(f"the data sets {', '.join(sets)} are neither in {shared} (SRCNN_SHARED_DATA) nor in {data_root} "
                f"(SRCNN_DATA_ROOT), and fetching them failed ({why}); set SRCNN_DATA_URL to a mirror", pytrace=False)


@pytest.fixture(scope="session")
def real_data() -> Path:
    data_root = Path(default_data_root())
    return find_real_data(SHARED_DATA, data_root if data_root.is_absolute() else ROOT / data_root,
                          os.environ.get("SRCNN_DATA_URL"))


def generated_image(size: int, seed: int) -> Image.Image:
    """A size x size RGB test picture with smooth colour gradients and sharp shapes: detail for a
    super-resolution network to learn, made without any data set."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 8 + 2, size // 8 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        (left, right), (top, bottom) = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
        box, colour = (int(left), int(top), int(right), int(bottom)), tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse(box, outline=colour, width=2) if rng.random() < 0.5 else draw.rectangle(box, fill=colour)
    return image


@pytest.fixture(scope="session")
def mini_root(tmp_path_factory) -> Path:
    """A tiny data root of generated pictures: two 72x72 training images, two 60x60 evaluation images."""
    root = tmp_path_factory.mktemp("mini")
    for folder, size, seeds in (("T91", 72, (1, 2)), ("Set5", 60, (3, 4))):
        (root / folder).mkdir()
        for seed in seeds:
            generated_image(size, seed).save(root / folder / f"scene{seed}.png")
    return root
