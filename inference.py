"""The one inference path (bicubic input, network, exact tiling, self-ensemble) and the one
evaluation; super_resolve.py, train.py and report.py all use these."""

import functools
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data import split_modes, upscale
from model import SRCNN
from utils import UserError, image_to_tensor, load_checkpoint, psnr, quantize, ssim, tensor_to_image

RECEPTIVE_RADIUS = 6  # 9x9 then 1x1 then 5x5: an output pixel sees 6 pixels each way
DEFAULT_TILE = 768  # ONNX Runtime: 96% of its whole-image speed at 512, 100% from 768 (README Speed)


# ---------------------------------------------------------------- the model from a checkpoint

HERE = Path(__file__).resolve().parent
SHIPPED = {2: HERE / "models" / "srcnn_x2.pth", 3: HERE / "checkpoint.pth", 4: HERE / "models" / "srcnn_x4.pth"}


def shipped_checkpoint(scale: int | None, otherwise: str) -> Path:
    """The trained model this project ships for `scale`; None: x3, the assignment's. `otherwise`
    says how the caller takes a model of another scale."""
    shipped = f"x{', x'.join(map(str, SHIPPED))}"
    if scale is not None and scale < 2:
        raise UserError(f"--scale must be at least 2 (models are shipped for {shipped})")
    if scale is not None and scale not in SHIPPED:
        raise UserError(f"no model is shipped for x{scale} (only {shipped}); {otherwise}")
    return SHIPPED[scale or 3]


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


def forward_ensemble(model: "Network", x: torch.Tensor) -> torch.Tensor:
    """Mean of the network over the 8 flips/rotations of `x`, each undone."""
    total = torch.zeros_like(x)
    for k in range(4):
        for flip in (False, True):
            t = x.flip(-1) if flip else x
            y = model(t.rot90(k, (-2, -1))).rot90(-k, (-2, -1))
            total += y.flip(-1) if flip else y
    return total / 8


@torch.no_grad()
def enhance(network: "Network", image: torch.Tensor, self_ensemble: bool = False,
            tile: int = DEFAULT_TILE) -> torch.Tensor:
    """SRCNN output for a bicubic-upscaled uint8 3 x H x W image, as uint8 3 x H x W.

    Works tile by tile, so memory stays bounded for any image size on CPU and GPU alike, with
    enough overlap that the result equals whole-image inference.
    """
    in_torch = isinstance(network, SRCNN)
    device = next(network.parameters()).device if in_torch else network.device
    _, height, width = image.shape
    if not in_torch and not self_ensemble:  # every pass over the pixels inside ONNX Runtime
        pixels, out = image.permute(1, 2, 0).numpy(), np.empty((height, width, 3), np.uint8)
        for (top, bottom, left, right), (t0, b0, l0, r0) in tile_windows(height, width, tile):
            out[top:bottom, left:right] = network.images(pixels[t0:b0, l0:r0])[top - t0 : bottom - t0,
                                                                              left - l0 : right - l0]
        return torch.from_numpy(out).permute(2, 0, 1)
    out = torch.empty(height, width, 3, dtype=torch.uint8).permute(2, 0, 1)  # HWC memory, as images are
    for (top, bottom, left, right), (t0, b0, l0, r0) in tile_windows(height, width, tile):
        x = image[:, t0:b0, l0:r0].to(device).float().div_(255).unsqueeze(0)
        if in_torch:  # PyTorch's CPU convolutions are fastest on channels_last; ONNX Runtime takes NCHW
            x = x.contiguous(memory_format=torch.channels_last)
        y = forward_ensemble(network, x) if self_ensemble else network(x)
        out[:, top:bottom, left:right] = quantize(y[0, :, top - t0 : bottom - t0, left - l0 : right - l0]).cpu()
    return out


@torch.no_grad()
def evaluate(model: SRCNN | None, pairs: list, scale: int, self_ensemble: bool = False,
             keep_outputs: bool = False, progress: str | None = None) -> dict:
    """Mean Y-PSNR and SSIM (border `scale` shaved) over (name, input, HR) pairs; None = bicubic.
    'images' holds each image's name and scores, and with `keep_outputs` its output (uint8).
    `progress`: the label of a progress bar on stderr (default: none)."""
    network = None if model is None else engine_for(model)
    images = []
    for name, lr_up, hr in tqdm(pairs, desc=progress, unit="image", leave=False, file=sys.stderr,
                                disable=progress is None):
        sr = lr_up if network is None else enhance(network, lr_up, self_ensemble)
        images.append({"name": name, "psnr": psnr(sr, hr, shave=scale), "ssim": ssim(sr, hr, shave=scale)}
                      | ({"output": sr} if keep_outputs else {}))
    return {"psnr": sum(i["psnr"] for i in images) / len(images), "ssim": sum(i["ssim"] for i in images) / len(images),
            "images": images}


def super_resolve_image(
    network: "Network", image: Image.Image, scale: int, self_ensemble: bool = False, degradation: str = "pil"
) -> Image.Image:
    """Upscale a low-resolution image of any mode by `scale`: bicubic (Pillow's or MATLAB's), then SRCNN."""
    rgb, alpha, gray = split_modes(image)
    out = tensor_to_image(enhance(network, image_to_tensor(upscale(rgb, scale, degradation)), self_ensemble))
    if gray:
        out = out.convert("L")
    if alpha is not None:
        out.putalpha(upscale(alpha, scale))
    return out


# ---------------------------------------------------------------- ONNX: the export, and ONNX Runtime as an engine

ENGINES = ("auto", "torch", "onnxruntime")


class GraphChain:
    """An ONNX graph built as a chain of steps: each node takes the current tensor (and constant
    arguments, stored as initializers), and its output becomes the current tensor."""

    def __init__(self, first: str) -> None:
        self.nodes, self.weights, self.current = [], [], first

    def then(self, op: str, *arguments: np.ndarray, names: tuple[str, ...] = (), **attributes) -> None:
        from onnx import helper, numpy_helper

        names = names or tuple(f"{op}{len(self.nodes)}.{i}" for i in range(len(arguments)))
        self.weights.extend(numpy_helper.from_array(a, name) for a, name in zip(arguments, names, strict=True))
        self.nodes.append(helper.make_node(op, [self.current, *names], [f"{op}{len(self.nodes)}"], **attributes))
        self.current = self.nodes[-1].output[0]

    def interleave_phases(self, images: bool) -> None:
        """After a layer by phase: channel 4c + 2a + b at (y, x) becomes pixel (2y + a, 2x + b) of
        colour c, and the result is cut to the input's size."""
        from onnx import helper, numpy_helper

        self.then("DepthToSpace", blocksize=2, mode="CRD")
        self.nodes.append(helper.make_node("Shape", ["image" if images else "input"], ["size"],
                                           start=1 if images else 2, end=3 if images else 4))
        self.weights += [numpy_helper.from_array(np.zeros(2, np.int64), "origin"),
                         numpy_helper.from_array(np.array([2, 3]), "height_width")]
        self.nodes.append(helper.make_node("Slice", [self.current, "origin", "size", "height_width"], ["cropped"]))
        self.current = "cropped"


def onnx_model(model: SRCNN, images: bool = False, polyphase: bool = False):
    """The network as an ONNX model (onnx.ModelProto): Conv, Relu, Conv, Relu, Conv with the weights
    as initializers. Input "input", the bicubic-upscaled RGB image in [0, 1] (N x 3 x H x W float32,
    any N, H, W); output "output", the SRCNN image of the same size. With `images`, 8-bit images in
    and out instead (N x H x W x 3 uint8, as images lie in memory), converted inside the graph exactly
    as enhance converts them (/ 255; clamp to [0, 1], * 255, round), so no pass over pixels is left
    outside ONNX Runtime. With `polyphase`, the last layer runs as polyphase_conv says: the same
    sums, in a third of ONNX Runtime's CPU time."""
    import onnx
    from onnx import TensorProto, helper

    chain = GraphChain("image" if images else "input")
    if images:
        chain.then("Transpose", perm=[0, 3, 1, 2])
        chain.then("Cast", to=TensorProto.FLOAT)
        chain.then("Div", np.float32(255))
    for i, conv in enumerate((model.conv1, model.conv2, model.conv3), start=1):
        by_phase, pad = i == 3 and polyphase, conv.padding[0]
        weight, bias = (p.detach().float().cpu().contiguous().numpy()
                        for p in (polyphase_conv(conv) if by_phase else (conv.weight, conv.bias)))
        chain.then("Conv", weight, bias, names=(f"conv{i}.weight", f"conv{i}.bias"),
                   kernel_shape=list(weight.shape[2:]), strides=[2, 2] if by_phase else [1, 1],
                   pads=[pad, pad, pad + 1, pad + 1] if by_phase else [pad] * 4)
        if i < 3:
            chain.then("Relu")
    if images:
        chain.then("Clip", np.float32(0), np.float32(1))
        chain.then("Mul", np.float32(255))
        chain.then("Round")
        chain.then("Cast", to=TensorProto.UINT8)
    if polyphase:
        chain.interleave_phases(images)
    if images:
        chain.then("Transpose", perm=[0, 2, 3, 1])
    nodes = chain.nodes
    nodes[-1].output[0] = "sr" if images else "output"
    shape = ["batch", "height", "width", 3] if images else ["batch", 3, "height", "width"]
    kind = TensorProto.UINT8 if images else TensorProto.FLOAT
    graph = helper.make_graph(nodes, "srcnn", [helper.make_tensor_value_info(nodes[0].input[0], kind, shape)],
                              [helper.make_tensor_value_info(nodes[-1].output[0], kind, shape)], chain.weights)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="srcnn")
    proto.ir_version = 8  # what opset 17 needs; older ONNX Runtimes refuse newer IR versions
    onnx.checker.check_model(proto)
    return proto


def polyphase_conv(conv: torch.nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a stride-2 convolution, one pixel wider and padded (p, p, p + 1, p + 1),
    giving a k x k convolution's output in 2x2 blocks: output pixel (2y + a, 2x + b) of channel c
    is channel 4c + 2a + b at (y, x), its weights the k x k ones shifted by (a, b) among zeros, so
    every sum is the original one. Why: ONNX Runtime's blocked CPU convolution pads output channels
    to 8 or 16, so the last layer's 3 cost as much as 16; as 12 channels over a quarter of the
    positions with 36 taps instead of 25 it costs 16 * 36 / 4 against 16 * 25 per pixel."""
    out_channels, in_channels, k, _ = conv.weight.shape
    weight = conv.weight.new_zeros(out_channels, 2, 2, in_channels, k + 1, k + 1)
    for a in range(2):
        for b in range(2):
            weight[:, a, b, :, a : a + k, b : b + k] = conv.weight
    return weight.reshape(4 * out_channels, in_channels, k + 1, k + 1), conv.bias.repeat_interleave(4)


def export_onnx(model: SRCNN, path: Path) -> None:
    """Write onnx_model(model) for deployment without this project."""
    try:
        import onnx
    except ImportError:
        raise UserError("--export needs the onnx package: pip install onnx") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(onnx_model(model), path)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None


class OnnxRuntimeNetwork:
    """The same network run by ONNX Runtime, with its last layer by phase: 2.5-3x PyTorch's
    speed (README Speed): called like the model on 1 x 3 x H x W float tensors, or on 8-bit H x W x 3
    tiles through `images` (onnx_model's images=True graph), on the CPU. Each graph is made when
    first needed."""

    device = torch.device("cpu")

    def __init__(self, model: SRCNN) -> None:
        self.model = model

    def session(self, images: bool):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the threads PyTorch would use
        options.enable_mem_pattern = False  # a pattern per tile shape costs ~120 MB at 2000x2000 LR, no speed
        graph = onnx_model(self.model, images, polyphase=True)  # the export stays the plain network
        return onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])

    @functools.cached_property
    def float_session(self):
        return self.session(images=False)

    @functools.cached_property
    def image_session(self):
        return self.session(images=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.float_session.run(None, {"input": x.contiguous().numpy()})[0])

    def images(self, tile: np.ndarray) -> np.ndarray:
        """SRCNN on one uint8 H x W x 3 tile, as uint8 H x W x 3."""
        return self.image_session.run(None, {"image": np.ascontiguousarray(tile)[None]})[0][0]


Network = SRCNN | OnnxRuntimeNetwork


def engine_for(model: SRCNN, engine: str = "auto") -> Network:
    """What runs the network: ONNX Runtime for a model on the CPU when onnx and onnxruntime (1.21 or
    later, the first with 8-bit DepthToSpace) are installed ("auto"), else the model itself; "torch"
    or "onnxruntime" to choose."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    if engine == "torch" or (engine == "auto" and not on_cpu):
        return model
    if not on_cpu:
        raise UserError("ONNX Runtime runs the network on the CPU here; leave out --cuda or choose --engine torch")
    try:
        import onnx  # noqa: F401
        import onnxruntime
        usable = tuple(int(part) for part in onnxruntime.__version__.split(".")[:2]) >= (1, 21)
    except (ImportError, ValueError):
        usable = False
    if usable:
        return OnnxRuntimeNetwork(model)
    if engine == "auto":
        return model
    raise UserError("--engine onnxruntime needs: pip install onnx 'onnxruntime>=1.21'")
