"""The one inference path: the bicubic input, the network over the image in exact tiles, the
x8 self-ensemble, any image mode. super_resolve.py, the hub, the evaluation and the report use it,
with PyTorch or another engine (onnx_engine.py) running the network."""

import contextlib
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

from data import image_to_tensor, quantize, rgb_to_y, split_modes, tensor_to_image, upscale, with_luma


class Engine(Protocol):
    """A runner of the network other than PyTorch (onnx_engine.OnnxRuntimeNetwork): called like the
    model on 1 x 3 x H x W float tensors on its device, or on 8-bit H x W x 3 tiles by `images`."""

    device: torch.device
    model: nn.Module  # the network it runs

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def images(self, tile: np.ndarray) -> np.ndarray: ...


Network = nn.Module | Engine  # what enhance runs: the model itself, or an engine


DEFAULT_TILE = 768  # from about this size ONNX Runtime's tiles run as fast as the whole image (docs/speed.md)


# ---------------------------------------------------------------- the network on whole images


def tile_windows(height: int, width: int, tile: int, radius: int):
    """(output window, input window) pairs covering an image: each input window adds `radius`
    pixels of context (the network's receptive radius: 6 for 9-1-5), so the network's result on it
    is exact in the output window.

    Windows are (top, bottom, left, right); the output window is given relative to the input one too.
    """
    r = radius
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            t0, b0, l0, r0 = max(top - r, 0), min(bottom + r, height), max(left - r, 0), min(right + r, width)
            yield (top, bottom, left, right), (t0, b0, l0, r0)


def forward_ensemble(model: Network, x: torch.Tensor) -> torch.Tensor:
    """Mean of the network over the 8 flips/rotations of `x`, each undone."""
    total = torch.zeros_like(x)
    for k in range(4):
        for flip in (False, True):
            t = x.flip(-1) if flip else x
            y = model(t.rot90(k, (-2, -1))).rot90(-k, (-2, -1))
            total += y.flip(-1) if flip else y
    return total / 8


def picture(network: Network, x: torch.Tensor, luma: bool, self_ensemble: bool) -> torch.Tensor:
    """The network's output for a bicubic RGB tile `x` in [0, 1], as RGB in [0, 1]. With `luma` (a
    Y-channel network) the network runs on the tile's Y, and its output replaces that Y; Cb and Cr
    stay the bicubic input's, as the paper makes its colour pictures."""
    inputs = rgb_to_y(x * 255).unsqueeze(-3) / 255 if luma else x
    out = forward_ensemble(network, inputs) if self_ensemble else network(inputs)
    return with_luma(x, out) if luma else out


@contextlib.contextmanager
def ieee_float32_convolutions() -> Iterator[None]:
    """cuDNN's float32 convolutions in IEEE float32 inside the block, not TF32, PyTorch's default
    for them, which rounds their inputs to 10-bit mantissas (a relative error near 1e-3, enough to
    move an 8-bit output across a rounding boundary): a picture or score made on a GPU is then the
    CPU's up to float32 rounding. Training keeps TF32, for its speed. No effect on a CPU."""
    before = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision = before


@torch.no_grad()
@ieee_float32_convolutions()
def enhance(network: Network, image: torch.Tensor, self_ensemble: bool = False,
            tile: int = DEFAULT_TILE) -> torch.Tensor:
    """SRCNN output for a bicubic-upscaled uint8 3 x H x W image, as uint8 3 x H x W (a Y network's too).

    Works tile by tile, so memory stays bounded for any image size on CPU and GPU alike, with
    enough overlap that the result equals whole-image inference.
    """
    in_torch = isinstance(network, nn.Module)
    device = next(network.parameters()).device if in_torch else network.device
    shape = (network if in_torch else network.model).shape
    luma = shape.channels == 1
    _, height, width = image.shape
    if not in_torch and not self_ensemble and not luma:  # every pass over the pixels inside ONNX Runtime
        pixels, out = image.permute(1, 2, 0).numpy(), np.empty((height, width, 3), np.uint8)
        for (top, bottom, left, right), (t0, b0, l0, r0) in tile_windows(height, width, tile, shape.receptive_radius):
            out[top:bottom, left:right] = network.images(pixels[t0:b0, l0:r0])[top - t0 : bottom - t0,
                                                                              left - l0 : right - l0]
        return torch.from_numpy(out).permute(2, 0, 1)
    out = torch.empty(height, width, 3, dtype=torch.uint8).permute(2, 0, 1)  # HWC memory, as images are
    for (top, bottom, left, right), (t0, b0, l0, r0) in tile_windows(height, width, tile, shape.receptive_radius):
        x = image[:, t0:b0, l0:r0].to(device).float().div_(255).unsqueeze(0)
        if in_torch:  # PyTorch's CPU convolutions are fastest on channels_last; ONNX Runtime takes NCHW
            x = x.contiguous(memory_format=torch.channels_last)
        y = picture(network, x, luma, self_ensemble)
        out[:, top:bottom, left:right] = quantize(y[0, :, top - t0 : bottom - t0, left - l0 : right - l0]).cpu()
    return out


def super_resolve_image(
    network: Network, image: Image.Image, scale: int, self_ensemble: bool = False, degradation: str = "pil"
) -> Image.Image:
    """Upscale a low-resolution image of any mode by `scale`: bicubic (Pillow's or MATLAB's), then SRCNN."""
    rgb, alpha, gray = split_modes(image)
    out = tensor_to_image(enhance(network, image_to_tensor(upscale(rgb, scale, degradation)), self_ensemble))
    if gray:
        out = out.convert("L")
    if alpha is not None:
        out.putalpha(upscale(alpha, scale))
    return out


