import pytest
import torch
from PIL import Image

from model import SRCNN
from super_resolve import enhance, run_tiled, super_resolve_image


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SRCNN().eval()


def test_tiled_output_equals_whole_image_output(model):
    x = torch.rand(1, 3, 37, 29)
    whole = model(x)
    for tile in (7, 8, 16):
        assert (run_tiled(model, x, tile=tile) - whole).abs().max() < 1e-5


def test_self_ensemble_of_identity_is_identity():
    from model import init_identity_

    net = SRCNN()
    init_identity_(net, noise_std=0.0)
    x = torch.rand(1, 3, 11, 13)
    assert torch.allclose(enhance(net, x, self_ensemble=True), x, atol=1e-6)


@pytest.mark.parametrize(
    "mode, out_mode",
    [("RGB", "RGB"), ("L", "L"), ("P", "RGB"), ("RGBA", "RGBA"), ("LA", "LA"), ("CMYK", "RGB"), ("I;16", "L"),
     ("1", "L")],
)
def test_every_mode_gives_right_size_and_mode(model, mode, out_mode):
    image = Image.new("RGB", (10, 7), (120, 60, 200)).convert(mode)
    out = super_resolve_image(model, image, 3, torch.device("cpu"))
    assert out.size == (30, 21) and out.mode == out_mode


def test_alpha_is_upscaled_and_kept(model):
    image = Image.new("RGBA", (8, 8), (10, 200, 30, 0))
    image.paste((10, 200, 30, 255), (0, 0, 4, 8))
    out = super_resolve_image(model, image, 3, torch.device("cpu"))
    alpha = out.getchannel("A")
    assert alpha.getpixel((0, 0)) == 255 and alpha.getpixel((23, 23)) == 0
