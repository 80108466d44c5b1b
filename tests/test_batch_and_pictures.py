import pytest
import torch
from PIL import Image

from conftest import assert_clean_error
from data import downscale
from model import SRCNN


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "weights.pth"
    torch.save(SRCNN().state_dict(), path)
    return path


def test_folders_and_globs_skip_broken_files_and_report(cli, weights, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, size in (("a.png", (5, 4)), ("b.bmp", (6, 6))):
        Image.effect_noise(size, 40).convert("RGB").save(folder / name)
    (folder / "c.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    result = cli("super_resolve", "--checkpoint", str(weights), str(folder), "--output", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "skipped" in result.stderr and "c.png" in result.stderr and "2 image(s) written, 1 failed" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_srcnn_x3.png", "b_srcnn_x3.png"]

    result = cli("super_resolve", "--checkpoint", str(weights), str(folder / "*.png"), str(folder / "b.bmp"),
                 "--output", str(tmp_path / "globbed"))
    assert result.returncode == 1 and "1 failed" in result.stderr
    assert Image.open(tmp_path / "globbed" / "a_srcnn_x3.png").size == (15, 12)

    result = cli("super_resolve", "--checkpoint", str(weights), str(folder / "a.png"), str(folder / "b.bmp"),
                 "--output", str(tmp_path / "good"))
    assert result.returncode == 0 and "2 image(s) written, 0 failed" in result.stderr


def test_compare_picture_with_ground_truth_and_crop(cli, weights, mini_root, tmp_path):
    hr = mini_root / "Set5" / "baby.png"
    downscale(Image.open(hr), 3).save(tmp_path / "lr.png")
    args = ("--checkpoint", str(weights), str(tmp_path / "lr.png"), "--gt", str(hr))
    result = cli("super_resolve", *args, "--compare", str(tmp_path / "cmp.png"))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "cmp.png").size == (3 * 60 + 2 * 8, 60 + 28)  # three 60x60 panels, captions
    assert result.stdout.count("PSNR") == 2

    result = cli("super_resolve", *args, "--compare", str(tmp_path / "zoom.png"), "--crop", "10,20,16,8")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "zoom.png").size == (3 * 16 * 20 + 2 * 8, 8 * 20 + 28)  # zoomed x20
    assert_clean_error(cli("super_resolve", *args, "--compare", str(tmp_path / "z.png"), "--crop", "50,50,20,20"),
                       "outside")
