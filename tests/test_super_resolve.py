import pytest
import torch
from PIL import Image

from data import quantize
from inference import enhance, super_resolve_image, tile_windows
from model import ASSIGNMENT, SRCNN, Shape, init_identity_
from onnx_engine import engine_for


@pytest.fixture(scope="module", params=[ASSIGNMENT, Shape((9, 5, 5), (48, 24))], ids=str)
def model(request):
    """The assignment's network, and one of another shape: every path follows its receptive radius."""
    torch.manual_seed(0)
    return SRCNN(request.param).eval()


@torch.no_grad()
def test_tile_windows_give_the_whole_image_result(model):
    x = torch.rand(1, 3, 37, 29)
    whole = model(x)
    for tile in (7, 8, 16):
        tiled = torch.full_like(whole, float("nan"))
        for (top, bottom, left, right), (t0, b0, l0, r0) in tile_windows(37, 29, tile, model.shape.receptive_radius):
            y = model(x[:, :, t0:b0, l0:r0])
            tiled[:, :, top:bottom, left:right] = y[:, :, top - t0 : bottom - t0, left - l0 : right - l0]
        assert (tiled - whole).abs().max() < 1e-5


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
@torch.no_grad()
def test_enhance_tiled_equals_whole_image(model, engine):
    network = engine_for(model, engine)
    image = quantize(torch.rand(3, 40, 33))
    whole = enhance(network, image, tile=1000).int()
    reference = quantize(model(image.float().unsqueeze(0) / 255)[0]).int()
    assert (whole - reference).abs().max() <= (0 if engine == "torch" else 1)  # ONNX Runtime rounds otherwise
    for self_ensemble in (False, True):
        a = enhance(network, image, self_ensemble, tile=1000).int()
        b = enhance(network, image, self_ensemble, tile=9).int()
        assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 0.001  # only 8-bit rounding ties


def test_self_ensemble_of_identity_is_identity():
    net = SRCNN()
    init_identity_(net, noise_std=0.0)
    image = quantize(torch.rand(3, 11, 13))
    assert torch.equal(enhance(net, image, self_ensemble=True), image)


@pytest.mark.parametrize(
    "mode, out_mode",
    [("RGB", "RGB"), ("L", "L"), ("P", "RGB"), ("RGBA", "RGBA"), ("LA", "LA"), ("CMYK", "RGB"), ("I;16", "L"),
     ("1", "L")],
)
def test_every_mode_gives_right_size_and_mode(model, mode, out_mode):
    image = Image.new("RGB", (10, 7), (120, 60, 200)).convert(mode)
    out = super_resolve_image(model, image, 3)
    assert out.size == (30, 21) and out.mode == out_mode


def test_alpha_is_upscaled_and_kept(model):
    image = Image.new("RGBA", (8, 8), (10, 200, 30, 0))
    image.paste((10, 200, 30, 255), (0, 0, 4, 8))
    out = super_resolve_image(model, image, 3)
    alpha = out.getchannel("A")
    assert alpha.getpixel((0, 0)) == 255 and alpha.getpixel((23, 23)) == 0
