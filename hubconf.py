"""torch.hub entry points: the shipped SRCNN models (x2, x3, x4) inside your own code.

    import torch
    model = torch.hub.load("OWNER/srcnn", "srcnn", scale=3)          # the nn.Module, eval mode
    upscale = torch.hub.load("OWNER/srcnn", "upscaler", scale=2)     # PIL image -> PIL image
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


def srcnn(scale: int = 3, pretrained: bool = True) -> _model.SRCNN:
    """The 9-1-5 SRCNN (20,099 parameters) in eval mode, on the CPU. Input: the bicubic-upscaled RGB
    image in [0, 1], N x 3 x H x W; output: the super-resolved image, same size.

    scale: 2, 3 or 4, the factor of the shipped model to load (x3 is the assignment's).
    pretrained: load the shipped weights (read with torch.load(weights_only=True)); False gives
    the network with PyTorch's default initialisation, for any scale.
    """
    if not pretrained:
        return _model.SRCNN().eval()
    if scale not in _checkpoint.SHIPPED:
        raise ValueError(f"no SRCNN model is shipped for x{scale}; choose scale 2, 3 or 4")
    return _checkpoint.load_model(_checkpoint.SHIPPED[scale], _torch.device("cpu"), scale)[0]


def upscaler(scale: int = 3, self_ensemble: bool = False, degradation: str = "pil",
             engine: str = "auto") -> _abc.Callable[[_image.Image], _image.Image]:
    """A function that upscales a PIL image (any mode Pillow reads) by `scale` with the shipped
    model, exactly as `python super_resolve.py --scale N` does: bicubic, then SRCNN, 8-bit output,
    grayscale kept grayscale, alpha upscaled bicubically.

    scale: 2, 3 or 4. self_ensemble: average the 8 flips/rotations (8x slower, a little better).
    degradation: the bicubic before the network, "pil" (Pillow's) or "matlab" (MATLAB's imresize).
    engine: "auto" (ONNX Runtime when installed, else PyTorch), "torch" or "onnxruntime".
    """
    if engine not in _onnx_engine.ENGINES or degradation not in _data.DEGRADATIONS:
        raise ValueError(f"engine must be one of {', '.join(_onnx_engine.ENGINES)} and degradation pil or matlab")
    network = _onnx_engine.engine_for(srcnn(scale), engine)

    def upscale(image: _image.Image) -> _image.Image:
        return _inference.super_resolve_image(network, image, scale, self_ensemble, degradation)

    return upscale

