"""bench.py's second question: how fast an image is super-resolved (PyTorch, ONNX Runtime, a whole
super_resolve.py process against a minimal script) and how much memory super_resolve.py takes."""

import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from checkpoint import load_model
from data import rgb_to_y
from inference import enhance, super_resolve_image
from model import SRCNN
from onnx_engine import engine_for, export_onnx, onnx_model

CHECKPOINT = Path(__file__).with_name("checkpoint.pth")

def inference_megapixels(model: SRCNN, repeats: int) -> float:
    network = engine_for(model)
    image = Image.fromarray(torch.randint(0, 256, (512, 512, 3), dtype=torch.uint8).numpy())
    super_resolve_image(network, image, 3)
    start = time.perf_counter()
    for _ in range(repeats):
        out = super_resolve_image(network, image, 3)  # ends with the output on the CPU: synchronised
    return repeats * out.width * out.height / (time.perf_counter() - start) / 1e6


def network_megapixels(model: SRCNN, repeats: int, size: int = 1536) -> dict:
    """Megapixels/s of the network on one size x size input, alternated `repeats` times: our
    inference path (enhance: tiles, 8-bit output) with its default engine and with PyTorch, and
    ONNX Runtime on the exported model, whole, as a user of the export would run it."""
    x = torch.rand(3, size, size).mul(255).to(torch.uint8)
    network = engine_for(model)
    runs = {"ours": lambda: enhance(network, x), "pytorch": lambda: enhance(model, x)}
    try:
        import onnxruntime
        session = onnxruntime.InferenceSession(onnx_model(model).SerializeToString(),
                                               providers=["CPUExecutionProvider"])
        rgb = x.float()  # the export of a Y network takes its one channel (docs/deploy.md)
        feed = {"input": (rgb_to_y(rgb).unsqueeze(0) if model.shape.channels == 1 else rgb).div(255)[None].numpy()}
        runs["onnxruntime"] = lambda: session.run(None, feed)
    except ImportError:
        pass
    seconds = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: size * size / statistics.median(times) / 1e6 for name, times in seconds.items()}


MINIMAL_SCRIPT = """
import sys
import numpy as np
import onnxruntime
from PIL import Image

model, source, target = sys.argv[1:4]
session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
lr = Image.open(source).convert("RGB")
x = np.asarray(lr.resize((lr.width * 3, lr.height * 3), Image.Resampling.BICUBIC), np.float32).transpose(2, 0, 1)
x /= 255
out = np.empty((x.shape[1], x.shape[2], 3), np.uint8)
tile, margin = 512, 6
for top in range(0, x.shape[1], tile):
    for left in range(0, x.shape[2], tile):
        t0, l0 = max(top - margin, 0), max(left - margin, 0)
        window = np.ascontiguousarray(x[None, :, t0:top + tile + margin, l0:left + tile + margin])
        y = session.run(None, {"input": window})[0][0, :, top - t0:top - t0 + tile, left - l0:left - l0 + tile]
        out[top:top + tile, left:left + tile] = np.rint(np.clip(y, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
Image.fromarray(out).save(target)
"""


def end_to_end_seconds(size: int, repeats: int) -> dict | None:
    """Seconds of `python super_resolve.py` on a size x size LR image, and of the same job done by a
    minimal script (Pillow, ONNX Runtime in tiles, Pillow's PNG writer), as whole processes,
    alternated `repeats` times; with their outputs' sizes and largest difference. None without
    ONNX Runtime."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        Image.effect_noise((size, size), 64).convert("RGB").filter(ImageFilter.SMOOTH).save(folder / "lr.png")
        model = load_model(CHECKPOINT, torch.device("cpu"))[0]
        export_onnx(model, folder / "srcnn.onnx")
        commands = {
            "super_resolve.py": [str(Path(__file__).with_name("super_resolve.py")), "--checkpoint", str(CHECKPOINT),
                                 str(folder / "lr.png"), "--output", str(folder / "ours.png"), "--overwrite"],
            "minimal script": ["-c", MINIMAL_SCRIPT, str(folder / "srcnn.onnx"), str(folder / "lr.png"),
                               str(folder / "minimal.png")],
        }
        seconds = {name: [] for name in commands}
        for _ in range(repeats):
            for name, command in commands.items():
                start = time.perf_counter()
                subprocess.run([sys.executable, *command], check=True, capture_output=True)
                seconds[name].append(time.perf_counter() - start)
        ours, minimal = (np.asarray(Image.open(folder / name), np.int16) for name in ("ours.png", "minimal.png"))
        return {"seconds": {name: statistics.median(times) for name, times in seconds.items()},
                "bytes": {name: (folder / f"{name}.png").stat().st_size for name in ("ours", "minimal")},
                "largest_difference": int(np.abs(ours - minimal).max())}


def super_resolve_peak_rss(size: int) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `python super_resolve.py` on a size x size LR image."""
    with tempfile.TemporaryDirectory() as tmp:
        lr = Path(tmp) / "lr.png"
        Image.effect_noise((size, size), 64).convert("RGB").save(lr)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, str(Path(__file__).with_name("super_resolve.py")), "--checkpoint", str(CHECKPOINT),
             str(lr)], check=True, capture_output=True,
        )
        seconds = time.perf_counter() - start
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, seconds
