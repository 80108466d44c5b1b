"""How a score is computed: Y-PSNR and SSIM as the field computes them (BasicSR's
metrics/psnr_ssim.py: BT.601 luma as MATLAB's rgb2ycbcr, the 8-bit rounded output, `scale` pixels
shaved at each border), and their means over a data set."""

import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import quantize, rgb_to_y
from inference import Network, enhance


def _metric_planes(sr: torch.Tensor, hr: torch.Tensor, shave: int, y_channel: bool) -> tuple:
    """Both images as float64 in [0, 255], 8-bit rounded, reduced to Y if asked, borders shaved."""
    if sr.shape != hr.shape:
        raise ValueError(f"shape mismatch: {tuple(sr.shape)} vs {tuple(hr.shape)}")
    planes = []
    for x in (sr, hr):
        x = (x if x.dtype == torch.uint8 else quantize(x)).double()
        if y_channel and x.shape[-3] == 3:
            x = rgb_to_y(x).unsqueeze(-3)
        if shave:
            x = x[..., shave:-shave, shave:-shave]
        planes.append(x)
    return tuple(planes)


def psnr(sr: torch.Tensor, hr: torch.Tensor, shave: int = 0, y_channel: bool = True) -> float:
    """PSNR in dB of one C x H x W image pair, on the 8-bit rounded output (BasicSR convention).

    Float inputs are taken to be in [0, 1]; uint8 inputs in [0, 255].
    """
    sr, hr = _metric_planes(sr, hr, shave, y_channel)
    mse = torch.mean((sr - hr) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(sr: torch.Tensor, hr: torch.Tensor, shave: int = 0, y_channel: bool = True) -> float:
    """SSIM of one C x H x W image pair: 11x11 Gaussian (sigma 1.5), valid region, as BasicSR."""
    sr, hr = _metric_planes(sr, hr, shave, y_channel)
    x, y = sr.unsqueeze(0), hr.unsqueeze(0)
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # the five local means, in one pass
    g = _gaussian_window()
    channels = stack.shape[1]
    blurred = F.conv2d(stack, g.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    blurred = F.conv2d(blurred, g.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)  # separable
    mu_x, mu_y, xx, yy, xy = blurred.chunk(5, dim=1)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean().item()


@torch.no_grad()
def evaluate(network: Network | None, pairs: list, scale: int, self_ensemble: bool = False,
             keep_outputs: bool = False, progress: str | None = None) -> dict:
    """Mean Y-PSNR and SSIM (border `scale` shaved) over (name, input, HR) pairs of `network` (the
    model, or an engine that runs it); None = bicubic, the input itself. 'images' holds each image's
    name and scores, and with `keep_outputs` its output (uint8). `progress`: the label of a progress
    bar on stderr (default: none)."""
    images = []
    for name, lr_up, hr in tqdm(pairs, desc=progress, unit="image", leave=False, file=sys.stderr,
                                disable=progress is None):
        sr = lr_up if network is None else enhance(network, lr_up, self_ensemble)
        images.append({"name": name, "psnr": psnr(sr, hr, shave=scale), "ssim": ssim(sr, hr, shave=scale)}
                      | ({"output": sr} if keep_outputs else {}))
    return {"psnr": sum(i["psnr"] for i in images) / len(images), "ssim": sum(i["ssim"] for i in images) / len(images),
            "images": images}
