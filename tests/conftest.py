"""Shared fixtures: the real data sets from ../shared/data, small copies of them, a CLI runner."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from utils import run_cli

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SRCNN_SHARED_DATA", ROOT.parent / "shared" / "data"))


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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "Set5").is_dir():
        pytest.fail(f"data sets not found at {SHARED_DATA}; set SRCNN_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mini_root(shared_data, tmp_path_factory) -> Path:
    """A tiny data root: 2 training crops and 2 evaluation crops of the real images."""
    root = tmp_path_factory.mktemp("mini")
    for folder, sources, size in (
        ("T91", ["T91/t1.bmp", "T91/tt1.bmp"], 72),
        ("Set5", ["Set5/baby.png", "Set5/bird.png"], 60),
    ):
        (root / folder).mkdir()
        for source in sources:
            image = Image.open(shared_data / source).convert("RGB")
            image.crop((0, 0, size, size)).save(root / folder / (Path(source).stem + ".png"))
    return root
