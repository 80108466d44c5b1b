"""The one inference path (bicubic input, network, exact tiling, self-ensemble) and the one
evaluation; super_resolve.py, train.py and report.py all use these."""

import copy
from pathlib import Path

import torch
from PIL import Image

from data import split_modes, upscale
from model import SRCNN
from utils import UserError, image_to_tensor, load_checkpoint, psnr, quantize, ssim, tensor_to_image

RECEPTIVE_RADIUS = 6  # 9x9 then 1x1 then 5x5: an output pixel sees 6 pixels each way
DEFAULT_TILE = 512


# ---------------------------------------------------------------- the model from a checkpoint


def load_model(path: str | Path, device: torch.device, scale: int | None = None) -> tuple[SRCNN, int, dict]:
    """(model in eval mode, scale, checkpoint) from one of our checkpoints or a bare state_dict
    (taken to be x3). A `scale` given by the user must agree with the checkpoint's."""
    checkpoint = load_checkpoint(path)
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict):
        raise UserError(f"{path}: 'model' entry is not a state_dict")
    model = SRCNN()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{path} is not an SRCNN checkpoint: missing keys {', '.join(missing)}")
    for key, tensor in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise UserError(f"{path}: '{key}' is not a floating-point tensor")
        if value.shape != tensor.shape:
            raise UserError(f"{path}: '{key}' has shape {tuple(value.shape)}, expected {tuple(tensor.shape)}")
    model.load_state_dict({k: state[k].float() for k in expected})
    saved_scale = checkpoint.get("scale", 3)
    if not isinstance(saved_scale, int) or saved_scale < 2:
        raise UserError(f"{path}: invalid scale {saved_scale!r}")
    if scale is not None and scale != saved_scale:
        raise UserError(f"{path} is an x{saved_scale} model; --scale {scale} contradicts it")
    return model.to(device, memory_format=torch.channels_last).eval(), saved_scale, checkpoint


# ---------------------------------------------------------------- the network on whole images


def tile_windows(height: int, width: int, tile: int):
    """(output window, input window) pairs covering an image: each input window adds
    RECEPTIVE_RADIUS pixels of context, so the network's result on it is exact in the output window.

    Windows are (top, bottom, left, right); the output window is given relative to the input one too.
    """
    r = RECEPTIVE_RADIUS
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            t0, b0, l0, r0 = max(top - r, 0), min(bottom + r, height), max(left - r, 0), min(right + r, width)
            yield (top, bottom, left, right), (t0, b0, l0, r0)


def forward_ensemble(model: SRCNN, x: torch.Tensor) -> torch.Tensor:
    """Mean of the network over the 8 flips/rotations of `x`, each undone."""
    total = torch.zeros_like(x)
    for k in range(4):
        for flip in (False, True):
            t = x.flip(-1) if flip else x
            y = model(t.rot90(k, (-2, -1))).rot90(-k, (-2, -1))
            total += y.flip(-1) if flip else y
    return total / 8


@torch.no_grad()
def enhance(model: SRCNN, image: torch.Tensor, self_ensemble: bool = False, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """SRCNN output for a bicubic-upscaled uint8 3 x H x W image, as uint8 3 x H x W.

    Works tile by tile, so memory stays bounded for any image size on CPU and GPU alike, with
    enough overlap that the result equals whole-image inference.
    """
    device = next(model.parameters()).device
    _, height, width = image.shape
    out = torch.empty(height, width, 3, dtype=torch.uint8).permute(2, 0, 1)  # HWC memory, as images are
    for (top, bottom, left, right), (t0, b0, l0, r0) in tile_windows(height, width, tile):
        x = image[:, t0:b0, l0:r0].to(device).float().div_(255).unsqueeze(0)
        x = x.contiguous(memory_format=torch.channels_last)
        y = forward_ensemble(model, x) if self_ensemble else model(x)
        out[:, top:bottom, left:right] = quantize(y[0, :, top - t0 : bottom - t0, left - l0 : right - l0]).cpu()
    return out


@torch.no_grad()
def evaluate(model: SRCNN | None, pairs: list, scale: int, self_ensemble: bool = False,
             keep_outputs: bool = False) -> dict:
    """Mean Y-PSNR and SSIM (border `scale` shaved) over (name, input, HR) pairs; None = bicubic.
    'images' holds each image's name and scores, and with `keep_outputs` its output (uint8)."""
    images = []
    for name, lr_up, hr in pairs:
        sr = lr_up if model is None else enhance(model, lr_up, self_ensemble)
        images.append({"name": name, "psnr": psnr(sr, hr, shave=scale), "ssim": ssim(sr, hr, shave=scale)}
                      | ({"output": sr} if keep_outputs else {}))
    return {"psnr": sum(i["psnr"] for i in images) / len(images), "ssim": sum(i["ssim"] for i in images) / len(images),
            "images": images}


def super_resolve_image(
    model: SRCNN, image: Image.Image, scale: int, self_ensemble: bool = False, degradation: str = "pil"
) -> Image.Image:
    """Upscale a low-resolution image of any mode by `scale`: bicubic (Pillow's or MATLAB's), then SRCNN."""
    rgb, alpha, gray = split_modes(image)
    out = tensor_to_image(enhance(model, image_to_tensor(upscale(rgb, scale, degradation)), self_ensemble))
    if gray:
        out = out.convert("L")
    if alpha is not None:
        out.putalpha(upscale(alpha, scale))
    return out


def export_onnx(model: SRCNN, path: Path) -> None:
    """The network as an ONNX model for deployment without this project: input the bicubic-upscaled
    RGB image in [0, 1] (N x 3 x H x W float32, any N, H, W), output the SRCNN image of the same size."""
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise UserError("--export needs the onnx and onnxscript packages: pip install onnx onnxscript") from None
    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)  # the caller's model stays as it is
    sizes = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=1),
             3: torch.export.Dim("width", min=1)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(model, (torch.rand(1, 3, 64, 64),), path, input_names=["input"], output_names=["output"],
                          dynamic_shapes={"x": sizes}, dynamo=True, verbose=False)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
