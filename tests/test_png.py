"""write_png: standard PNG files that read back exactly, about as small as Pillow's, in every mode."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

import utils
from utils import save_image, write_png


@pytest.mark.parametrize("shape", [(1, 1), (5, 7, 2), (37, 29, 3), (40, 33, 4), (64, 3, 3)])
def test_png_reads_back_exactly_in_every_mode(tmp_path, monkeypatch, shape):
    monkeypatch.setattr(utils, "PNG_BLOCK", 50)  # many blocks, each with its own thread and dictionary
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    pixels[: shape[0] // 2] //= 16  # runs that compress, so the filters and dictionaries matter
    write_png(Image.fromarray(pixels), tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as image:
        image.load()  # decoding checks every chunk's CRC and the zlib stream's checksum
        assert image.format == "PNG" and np.array_equal(np.asarray(image), pixels)


def test_png_is_about_as_small_as_pillows(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "PNG_BLOCK", 100_000)  # 7 blocks
    image = Image.effect_noise((600, 400), 40).convert("RGB").filter(ImageFilter.SMOOTH)
    image = Image.merge("RGB", (image.getchannel(0), image.getchannel(0).rotate(90), Image.linear_gradient("L")
                                .resize(image.size)))
    image.save(tmp_path / "pillow.png")
    save_image(image, tmp_path / "ours.png")
    ours, pillow = ((tmp_path / f"{name}.png").stat().st_size for name in ("ours", "pillow"))
    assert abs(ours / pillow - 1) < 0.02, (ours, pillow)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ours.png")), np.asarray(image))
