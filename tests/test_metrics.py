import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from conftest import generated_image
from data import load_pairs, quantize, rgb_to_y
from metrics import evaluate, psnr, ssim


def test_psnr_of_one_level_difference_by_hand():
    hr = torch.full((3, 10, 10), 100, dtype=torch.uint8)
    sr = hr + 1
    assert psnr(sr, hr, y_channel=False) == pytest.approx(10 * math.log10(255**2 / 1.0))
    y_diff = (65.481 + 128.553 + 24.966) / 255  # Y moves by 219/255 per RGB level
    assert psnr(sr, hr) == pytest.approx(10 * math.log10(255**2 / y_diff**2))


def test_psnr_shaves_border_and_rounds_to_8_bit():
    hr = torch.zeros(3, 12, 12, dtype=torch.uint8)
    sr = hr.clone()
    sr[:, 0, :] = 255  # only in the shaved border
    assert psnr(sr, hr, shave=3) == math.inf
    float_sr = torch.full((3, 12, 12), 0.4 / 255)  # rounds to level 0 like a saved image
    assert psnr(float_sr, hr) == math.inf


@pytest.mark.parametrize("shave", [1, 2, 3, 4])
def test_psnr_shaves_exactly_scale_pixels_at_each_border(shave):
    """Issue 69: a shave off by one went unseen by the quick subset. A difference in the last shaved
    row or column of any border leaves PSNR infinite; one level in the first kept pixel of each border
    gives the hand-computed figure (BT.601: one RGB level moves Y by 219/255)."""
    size = 16
    hr = torch.full((3, size, size), 100, dtype=torch.uint8)
    for edge in (shave - 1, size - shave):  # the innermost shaved row and column at both ends
        sr = hr.clone()
        sr[:, edge, :] += 1
        sr[:, :, edge] += 1
        assert psnr(sr, hr, shave=shave) == math.inf
    kept, inner = size - 2 * shave, shave + 1
    for row, column in ((shave, inner), (size - shave - 1, inner), (inner, shave), (inner, size - shave - 1)):
        sr = hr.clone()  # one pixel in the outermost kept row or column of a border
        sr[:, row, column] += 1
        mse = (219 / 255) ** 2 / kept**2  # one pixel of kept x kept off by one Y step
        assert psnr(sr, hr, shave=shave) == pytest.approx(10 * math.log10(255**2 / mse))


def test_ssim_equals_scikit_images_on_a_generated_pair():
    """Issue 69: a changed window sigma went unseen by the quick subset (only the real-data test,
    slow, compared with scikit-image). Here a generated picture and a noisy copy, in a second."""
    hr = torch.from_numpy(np.array(generated_image(40, 5))).permute(2, 0, 1).contiguous()
    noise = torch.from_numpy(np.random.default_rng(0).normal(0, 12, hr.shape))
    sr = (hr.double() + noise).round().clamp(0, 255).to(torch.uint8)
    planes = [rgb_to_y(x.double())[3:-3, 3:-3].numpy() for x in (sr, hr)]
    expected = structural_similarity(*planes, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=255)
    assert ssim(sr, hr, shave=3) == pytest.approx(expected, abs=1e-6)


def test_rgb_to_y_matches_matlab_range():
    assert rgb_to_y(torch.zeros(3, 1, 1)).item() == pytest.approx(16.0)
    assert rgb_to_y(torch.full((3, 1, 1), 255.0)).item() == pytest.approx(235.0)


def test_ssim_of_constant_images_by_hand():
    a, b = 100.0, 120.0
    c1 = (0.01 * 255) ** 2
    x = torch.full((3, 16, 16), int(a), dtype=torch.uint8)
    y = torch.full((3, 16, 16), int(b), dtype=torch.uint8)
    ya, yb = 16 + 219 / 255 * a, 16 + 219 / 255 * b
    assert ssim(x, x) == pytest.approx(1.0)
    assert ssim(x, y) == pytest.approx((2 * ya * yb + c1) / (ya**2 + yb**2 + c1), rel=1e-9)


def test_ssim_falls_as_noise_grows():
    torch.manual_seed(0)
    hr = torch.linspace(0.2, 0.8, 32).expand(3, 32, 32)
    noise = torch.randn(3, 32, 32)
    scores = [ssim(quantize(hr + level * noise), quantize(hr)) for level in (0.0, 0.01, 0.05, 0.2)]
    assert scores[0] == pytest.approx(1.0)
    assert scores[0] > scores[1] > scores[2] > scores[3] > 0


# bicubic under both protocols (x3, Y, 3-pixel border): the field's reference figures, e.g. Set5
# 30.39-30.41 dB in SR papers' tables; BSD100 27.21 as ../shared/data/README.md gives it
BICUBIC = {
    ("Set5", "pil"): (30.4032, 0.8689), ("Set14", "pil"): (27.6312, 0.7759), ("BSD100", "pil"): (27.2081, 0.7394),
    ("Set5", "matlab"): (30.4047, 0.8690), ("Set14", "matlab"): (27.6341, 0.7760),
    ("BSD100", "matlab"): (27.2098, 0.7395),
}


@pytest.mark.slow
@pytest.mark.parametrize("name, degradation", list(BICUBIC))
def test_bicubic_scores_under_both_protocols(real_data, name, degradation):
    scores = evaluate(None, load_pairs(real_data / name, 3, degradation=degradation), 3)
    assert scores["psnr"] == pytest.approx(BICUBIC[name, degradation][0], abs=5e-4)
    assert scores["ssim"] == pytest.approx(BICUBIC[name, degradation][1], abs=5e-5)


@pytest.mark.slow
def test_ssim_equals_scikit_images(real_data):
    """scikit-image's SSIM with Gaussian weights (sigma 1.5), population covariances, data range 255."""
    for _, x, y in load_pairs(real_data / "Set5", 3):
        planes = [rgb_to_y(image.double())[3:-3, 3:-3].numpy() for image in (x, y)]
        expected = structural_similarity(*planes, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=255)
        assert ssim(x, y, shave=3) == pytest.approx(expected, abs=1e-6)
