"""torch.hub entry points: the shipped SRCNN models (9-1-5 on RGB, 9-5-5 on Y, each at x2, x3, x4) in your code.

    import torch
    model = torch.hub.load("OWNER/srcnn", "srcnn", scale=3)          # the nn.Module, eval mode
    upscale = torch.hub.load("OWNER/srcnn", "upscaler", scale=2)     # PIL image -> PIL image
    best = torch.hub.load("OWNER/srcnn", "upscaler", network="955")  # the paper's 9-5-5 on Y, x3
    # on a clone: torch.hub.load("path/to/srcnn", "srcnn", source="local")
"""

# modules under private names: torch.hub lists every public callable here as an entry
import collections.abc as _abc

import PIL.Image as _image
import torch as _torch

import checkpoint as _checkpoint
import data as _data
import inference as _inference
import model as _model
import onnx_engine as _onnx_engine

dependencies = ["torch", "numpy", "PIL", "tqdm"]


def srcnn(scale: int = 3, pretrained: bool = True, network: str = "915") -> _model.SRCNN:
    """An SRCNN in eval mode, on the CPU: the assignment's 9-1-5 on RGB (20,099 parameters), or the
    paper's 9-5-5 as shipped (`model.shape` says which channels). Input: the bicubic-upscaled image in
    [0, 1], RGB as N x 3 x H x W, or for a Y model (`model.shape.channels == 1`) its Y channel
    as N x 1 x H x W (BT.601, `data.rgb_to_y(rgb * 255) / 255`); output: the super-resolved image in
    the same form and size. The "upscaler" entry does all of this for a PIL image.

    scale: the factor of the shipped model to load: 2, 3 or 4 (x3 is the assignment's).
    pretrained: load the shipped weights (read with torch.load(weights_only=True)); False gives
    the shipped model's network with PyTorch's default initialisation, for any scale.
    network: "915" or "955", its filter sizes, as super_resolve.py's --model names them (torch.hub.load
    takes `model` for the entry's name).
    """
    if network not in _checkpoint.SHIPPED_NETWORKS:
        raise ValueError(f"network must be one of {', '.join(_checkpoint.SHIPPED_NETWORKS)}, not {network!r}")
    if not pretrained:
        shipped = next(path for (n, _), path in _checkpoint.SHIPPED.items() if n == network)
        return _model.SRCNN(_checkpoint.shape_of(_checkpoint.load(shipped), shipped)).eval()
    if (network, scale) not in _checkpoint.SHIPPED:
        shipped = ", ".join(str(s) for n, s in _checkpoint.SHIPPED if n == network)
        raise ValueError(f"no {network} SRCNN model is shipped for x{scale}; choose scale {shipped}")
    return _checkpoint.load_model(_checkpoint.SHIPPED[network, scale], _torch.device("cpu"), scale)[0]


def upscaler(scale: int = 3, self_ensemble: bool = False, degradation: str = "pil",
             engine: str = "auto", network: str = "915") -> _abc.Callable[[_image.Image], _image.Image]:
    """A function that upscales a PIL image (any mode Pillow reads) by `scale` with the shipped
    model, exactly as `python super_resolve.py --scale N --model NETWORK` does: bicubic, then SRCNN,
    8-bit output, grayscale kept grayscale, alpha upscaled bicubically.

    scale: 2, 3 or 4. self_ensemble: average the 8 flips/rotations (8x slower, a little better).
    degradation: the bicubic before the network, "pil" (Pillow's) or "matlab" (MATLAB's imresize).
    engine: "auto" (ONNX Runtime when installed, else PyTorch), "torch" or "onnxruntime".
    network: "915" (the assignment's) or "955" (the paper's 9-5-5 on Y).
    """
    if engine not in _onnx_engine.ENGINES or degradation not in _data.DEGRADATIONS:
        raise ValueError(f"engine must be one of {', '.join(_onnx_engine.ENGINES)} and degradation pil or matlab")
    network = _onnx_engine.engine_for(srcnn(scale, network=network), engine)

    def upscale(image: _image.Image) -> _image.Image:
        return _inference.super_resolve_image(network, image, scale, self_ensemble, degradation)

    return upscale

