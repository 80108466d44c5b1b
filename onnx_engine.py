"""ONNX: the network as an ONNX graph (the export of `super_resolve.py --export`), and ONNX
Runtime as the engine that runs it on the CPU for super_resolve.py, `train.py evaluate` and the
hub. onnx and onnxruntime are imported where first needed: training never needs them."""

import functools
from pathlib import Path

import numpy as np
import torch

from files import atomic_write
from inference import Network
from model import SRCNN, phase_weights
from utils import UserError

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
    outside ONNX Runtime. With `polyphase`, the last layer runs as model.phase_weights says: the
    same sums, in a third of ONNX Runtime's CPU time."""
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
                        for p in (phase_weights(conv.weight, conv.bias) if by_phase else (conv.weight, conv.bias)))
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
    channels = model.shape.channels  # 3, or 1 for a Y network (whose graph takes and gives its Y, not 8-bit images)
    shape = ["batch", "height", "width", channels] if images else ["batch", channels, "height", "width"]
    kind = TensorProto.UINT8 if images else TensorProto.FLOAT
    graph = helper.make_graph(nodes, "srcnn", [helper.make_tensor_value_info(nodes[0].input[0], kind, shape)],
                              [helper.make_tensor_value_info(nodes[-1].output[0], kind, shape)], chain.weights)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="srcnn")
    proto.ir_version = 8  # what opset 17 needs; older ONNX Runtimes refuse newer IR versions
    onnx.checker.check_model(proto)
    return proto


def export_onnx(model: SRCNN, path: Path) -> None:
    """Write onnx_model(model) for deployment without this project."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError("--export needs the onnx package: pip install onnx") from None
    proto = onnx_model(model)
    with atomic_write(path) as f:
        f.write(proto.SerializeToString())


class OnnxRuntimeNetwork:
    """The same network run by ONNX Runtime, with its last layer by phase: 2.5-3x PyTorch's
    speed (docs/speed.md): called like the model on 1 x 3 x H x W float tensors, or on 8-bit H x W x 3
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
