"""Benchmark: training and inference speed on this machine, in one run.

    python bench.py            # full run (a few minutes)
    python bench.py --quick    # short run
    python bench.py --json     # also print the figures as JSON
    python bench.py --data     # training on T91 against a DIV2K-sized collection (streamed)
    python bench.py --against /tmp/old   # the x3 recipe's epoch against another tree's train.py

Training throughput of train.py's own step is measured against a textbook loop (a Dataset that
returns one float32 patch pair per item, a shuffling DataLoader, default memory format), the two
alternating in one run, so the ratio holds whatever else the machine does.
"""

import argparse
import copy
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import interrupts  # noqa: F401  (first: Ctrl-C while torch loads ends in one line)

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset

from checkpoint import INTERRUPTED, LAST, load_model, shape_of_args
from data import image_size, list_images, load_rgb, rgb_to_y
from download import default_data_root
from inference import enhance, super_resolve_image
from model import ASSIGNMENT, SRCNN, Shape, conv_by_phase
from onnx_engine import engine_for, export_onnx, onnx_model
from options import filter_sizes
from processes import reuse_freed_memory
from step import (
    PASS_PIXELS,
    CapturedStep,
    capturable,
    cpu_pass,
    last_layer_by_phase,
    make_batch,
    mixed_precision,
    native_bf16,
    optimizer_steps,
    train_step,
    update_ema,
)
from utils import HelpFormatter, UserError, choose_device, run_cli

PATCH, BATCH = 33, 128
CHECKPOINT = Path(__file__).with_name("checkpoint.pth")

T = TypeVar("T")


class TextbookPatches(Dataset):
    """What the popular SRCNN ports do: one float32 (input, target) pair per __getitem__."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i].float() / 255, self.targets[i].float() / 255


def synchronize(device: torch.device) -> None:
    """Wait for the device, so that a timer stopped next measures work done, not work queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def textbook_epoch(inputs: torch.Tensor, targets: torch.Tensor, device: torch.device, shape: Shape) -> float:
    """A port's loop; for a Y network its patches are Y already (ports prepare them beforehand)."""
    if shape.channels == 1:
        inputs, targets = (rgb_to_y(t.float()).round().to(torch.uint8).unsqueeze(1) for t in (inputs, targets))
    model = SRCNN(shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = DataLoader(TextbookPatches(inputs, targets), batch_size=BATCH, shuffle=True)
    synchronize(device)
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return len(inputs) / (time.perf_counter() - start)


def our_epoch(inputs: torch.Tensor, targets: torch.Tensor, device: torch.device, shape: Shape) -> float:
    """train.py's own path: uint8 patches held on the device, make_batch, channels_last, train_step."""
    model = step_model(device, shape)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    autocast, scaler = mixed_precision({"amp": "off"}, device)  # float32, as train.py trains by default
    pass_patches = cpu_pass(PATCH, BATCH) if device.type == "cpu" else None
    inputs, targets = inputs.to(device), targets.to(device)
    synchronize(device)
    start = time.perf_counter()
    for index in torch.randperm(len(inputs), device=device).split(BATCH):
        x, y = make_batch(inputs[index], targets[index], 0, shape.channels == 1)
        train_step(model, optimizer, x, y, autocast, scaler, pass_patches=pass_patches)
    synchronize(device)
    return len(inputs) / (time.perf_counter() - start)


def layer_macs(shape: Shape) -> list[int]:
    """Multiply-adds per pixel of each of the network's three convolutions."""
    model = SRCNN(shape)
    return [conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
            for conv in (model.conv1, model.conv2, model.conv3)]


def training_flops_per_patch(shape: Shape, size: int = PATCH) -> float:
    """Convolution FLOPs of one patch's forward + backward pass, counting what is computed:
    forward and weight gradient of every layer, input gradient of all but the first."""
    return sum(2 * macs * size * size * (2 if i == 0 else 3) for i, macs in enumerate(layer_macs(shape)))


def matmul_gflops(seconds: float, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """The machine's matmul rate (2048x2048) in `dtype`: the best of one-second rounds after a warm-up,
    so that a slow moment does not make a peak that the convolutions then appear to beat."""
    a, b = (torch.rand(2048, 2048, device=device).to(dtype) for _ in range(2))
    for _ in range(3):
        torch.mm(a, b)
    synchronize(device)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 1:
            torch.mm(a, b)
            count += 1
        synchronize(device)
        best = max(best, count * 2 * 2048**3 / (time.perf_counter() - start) / 1e9)
    return best


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


def busy_cpu_seconds() -> tuple[float, int] | None:
    """(CPU seconds every process has used since boot, CPUs counted) from Linux's /proc/stat, else None."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in lines[0].split()[1:8])
    except (OSError, ValueError, IndexError):
        return None
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3].isdigit())
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), cpus


def own_cpu_seconds() -> float:
    """CPU seconds used by this process and the subprocesses it waited for."""
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usages)


def reliability_warnings(ours: list[float], textbook: list[float], others_share: float | None,
                         fractions: dict[str, float]) -> list[str]:
    """Why this run's figures may not be the machine's: repeats that disagree, a busy CPU, or a
    share of the matmul rate above 100% (the convolutions cannot beat matmul's peak by much: the
    machine was faster while they ran than while matmul did)."""
    warnings = [f"{name} ran at {share:.0%} of the measured matmul rate" for name, share in fractions.items()
                if share > 1]
    for name, rates in (("train.py", ours), ("textbook", textbook)):
        spread = (max(rates) - min(rates)) / statistics.median(rates)
        if spread > 0.10:
            warnings.append(f"the {name} loop's repeats differ by {spread:.0%}: the machine's speed changed")
    if others_share is not None and others_share > 0.10:
        warnings.append(f"other processes used {others_share:.0%} of the CPU during the run")
    return warnings


STEPS = ((16, 48, 0.9998), (128, 33, 0.0))  # (batch, patch size, EMA decay): the x3 recipe's step, the assignment's


def step_model(device: torch.device, shape: Shape, bf16: bool = False) -> SRCNN:
    """The network as train.py's Trainer trains it on `device`, in float32 or (`bf16`) --amp bf16."""
    model = SRCNN(shape).to(device, memory_format=torch.channels_last)
    model.last_layer_by_phase = last_layer_by_phase(device, bf16)
    return model


PRECISIONS = {"off": "float32", "bf16": "bf16"}  # --amp's value: the precision bench.py names a step by


def step_precisions(device: torch.device) -> list[str]:
    """The --amp values whose steps are timed: float32, and bf16 where it runs as it trains (a GPU, or
    a CPU that computes bfloat16 natively)."""
    return ["off", "bf16"] if device.type == "cuda" or native_bf16() else ["off"]


def step_table(device: torch.device, shape: Shape, calls: int) -> tuple[dict, dict]:
    """train.py's steps (STEPS) in each precision, and on CUDA plain and captured: ({name: ms},
    {name: (patches a pass, why)}), named as "16x48x48 bf16 captured"."""
    steps, passes = {}, {}
    for batch, size, ema in STEPS:
        for amp in step_precisions(device):
            for captured in (False, True) if device.type == "cuda" else (False,):
                name = f"{batch}x{size}x{size} {PRECISIONS[amp]}" + (" captured" if captured else "")
                steps[name] = round(step_milliseconds(batch, size, ema, device, calls, shape, captured, amp), 3)
                passes[name] = ((cpu_pass(size, batch), f"passes of about {PASS_PIXELS:,} pixels")
                                if device.type == "cpu" else
                                (batch, "CUDA: the whole batch" + (", as a CUDA graph" if captured else "")))
    return steps, passes


def step_milliseconds(batch: int, size: int, ema_decay: float, device: torch.device, calls: int,
                      shape: Shape, captured: bool = False, amp: str = "off") -> float:
    """train.py's step on `batch` patches of `size`, with the moving average if `ema_decay`, under
    --amp `amp`, as the Trainer takes it: on a CPU train_step in the passes it chooses, on CUDA the
    plain step or, with `captured`, the step captured as a CUDA graph (CapturedStep, --cuda-graph
    auto). The lower quartile of `calls` timed calls, after a warm-up that includes the capture."""
    model = step_model(device, shape, amp == "bf16")
    ema = copy.deepcopy(model) if ema_decay else None
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    args = {"patch_size": size, "loss_border": 0, "ema_decay": ema_decay, "amp": amp,
            "cuda_graph": "auto" if captured else "off"}
    autocast, scaler = mixed_precision(args, device)
    patches = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    if CapturedStep.possible(args, device, 1) is None:
        capturable(optimizer)
        graph = CapturedStep(model, optimizer, ema, args, autocast, scaler)

        def step() -> None:
            if graph(patches, patches, 0) is None:
                raise UserError(f"the captured step was given up: {graph.failure}")
    else:
        x, y = make_batch(patches, patches, 0, shape.channels == 1)
        pass_patches = cpu_pass(size, batch) if device.type == "cpu" else None

        def step() -> None:
            train_step(model, optimizer, x, y, autocast, scaler, pass_patches=pass_patches)
            if ema is not None:
                update_ema(ema, model, ema_decay, optimizer_steps(optimizer))
    times = []
    for _ in range(calls + 5):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times[5:])[calls // 4]


def layer_shares(batch: int, size: int, device: torch.device, calls: int, shape: Shape) -> dict[str, float]:
    """Each convolution's share of a pass's forward and backward (its input's gradient too, but the
    first's), timed alone at the pass size train.py chooses: where the step's time goes."""
    model = step_model(device, shape)
    pass_patches = cpu_pass(size, batch) if device.type == "cpu" else batch
    x = torch.rand(pass_patches, shape.channels, size, size, device=device).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        first = torch.relu(model.conv1(x))
        second = torch.relu(model.conv2(first))
    last = conv_by_phase if model.last_layer_by_phase else (lambda t, conv: conv(t))
    names = [f"conv{i} {c.kernel_size[0]}x{c.kernel_size[0]} {c.in_channels}->{c.out_channels}"
             for i, c in enumerate((model.conv1, model.conv2, model.conv3), start=1)]
    layers = {names[0]: (lambda t: model.conv1(t), x),
              names[1]: (lambda t: model.conv2(t), first.requires_grad_()),
              names[2] + (" (by phase)" if model.last_layer_by_phase else ""):
                  (lambda t: last(t, model.conv3), second.requires_grad_())}
    seconds = {}
    for name, (layer, t) in layers.items():
        times = []
        for _ in range(calls + 3):
            synchronize(device)
            start = time.perf_counter()
            out = layer(t)
            out.backward(torch.ones_like(out))
            synchronize(device)
            times.append(time.perf_counter() - start)
        seconds[name] = sorted(times[3:])[calls // 4]
    return {name: value / sum(seconds.values()) for name, value in seconds.items()}


def training_rates(device: torch.device, rounds: int, patches: int, shape: Shape) -> tuple[list[float], list[float]]:
    """Patches per second of train.py's loop and of the textbook loop, `rounds` each, alternated so
    that both see the same machine."""
    torch.manual_seed(0)
    inputs = torch.randint(0, 256, (patches, 3, PATCH, PATCH), dtype=torch.uint8)
    targets = torch.randint(0, 256, (patches, 3, PATCH, PATCH), dtype=torch.uint8)
    ours, textbook = [], []
    our_epoch(inputs[:256], targets[:256], device, shape)  # warm-up
    textbook_epoch(inputs[:256], targets[:256], device, shape)
    for _ in range(rounds):
        ours.append(our_epoch(inputs, targets, device, shape))
        textbook.append(textbook_epoch(inputs, targets, device, shape))
    return ours, textbook


# ---------------------------------------------------------------- --data: training on a large collection

DIV2K_COUNT, DIV2K_SIZE = 800, (2040, 1356)  # DIV2K's training set: 800 images of about 2040 x 1356
COLLECTION_SOURCES = ("BSD100", "Set14", "T91")  # what its pictures are cut from
# The memory sampler's most of one core. A read of a streamed run's proportional set size walks
# its 2-3 GB of pages in the kernel: 66 ms on a 2-core AMD EPYC VM (T91's run: 12 ms), so that
# reading it every 0.25 s took a quarter of a core from the collection's steps, a twentieth from T91's.
SAMPLER_SHARE = 0.02
SHARED_MEMORY = ("/dev/shm/", "/memfd:")  # how Linux names shared memory in /proc/PID/maps and fd


def make_collection(folder: Path, sources: list[Path], count: int, size: tuple[int, int], seed: int = 0) -> None:
    """Write `count` photo-like PNGs of `size` into `folder`: each a mosaic, row by row, of random
    crops of the `sources` images at random zooms of 1 to 1.6 (so that the collection holds detail
    a decoder and the degradation must work through, as photographs do)."""
    rng = np.random.default_rng(seed)
    pictures = [load_rgb(path) for path in sources]
    for n in range(count):
        canvas, top = Image.new("RGB", size), 0
        while top < size[1]:
            height, left = int(rng.integers(150, 330)), 0
            while left < size[0]:
                source, zoom = pictures[rng.integers(len(pictures))], rng.uniform(1.0, 1.6)
                width = int(rng.integers(200, 480))
                crop_w, crop_h = min(source.width, round(width / zoom)), min(source.height, round(height / zoom))
                x, y = int(rng.integers(source.width - crop_w + 1)), int(rng.integers(source.height - crop_h + 1))
                tile = source.crop((x, y, x + crop_w, y + crop_h)).resize((width, height), Image.Resampling.BICUBIC)
                canvas.paste(tile, (left, top))
                left += width
            top += height
        canvas.save(folder / f"{n:04d}.png", compress_level=1)


def tree_memory_bytes(pid: int) -> int:
    """The memory of process `pid` and all its descendants (the DataLoader workers): their
    proportional set size (memory shared between them counted once), plus the shared memory they
    hold open without mapping it: a part a worker has read waits for the training process so, in
    file descriptors (1 GB of the collection's run that the set size alone missed)."""
    total, pids, mapped, held = 0, [pid], set(), {}
    while pids:
        current = pids.pop()
        try:
            total += 1024 * sum(int(line.split()[1]) for line in Path(f"/proc/{current}/smaps_rollup").open()
                                if line.startswith("Pss:"))
            for task in Path(f"/proc/{current}/task").iterdir():
                pids += [int(child) for child in (task / "children").read_text().split()]
            mapped |= {int(fields[4]) for fields in map(str.split, Path(f"/proc/{current}/maps").open())
                       if len(fields) > 5 and fields[5].startswith(SHARED_MEMORY)}
            descriptors = list(Path(f"/proc/{current}/fd").iterdir())
        except (OSError, ValueError):  # it ended meanwhile
            continue
        for fd in descriptors:
            try:
                if os.readlink(fd).startswith(SHARED_MEMORY):
                    status = fd.stat()
                    held[status.st_ino] = 512 * status.st_blocks  # the pages it holds, not its length
            except OSError:  # closed meanwhile
                continue
    return total + sum(size for inode, size in held.items() if inode not in mapped)


class TrainingRun:
    """The x3 recipe trained on `folder` for one epoch by a child process, with the train.py of `tree`
    (this one's by default): the steps its progress bar showed and when, and its peak memory (the
    process tree's, sampled while it runs). The child leads its own process group, so that a pause
    stops its reading workers too: paused, a run takes nothing from the machine but memory."""

    def __init__(self, folder: Path, data_root: Path, out: Path, tree: Path = Path(__file__).parent,
                 flags: tuple[str, ...] = ()) -> None:
        command = [sys.executable, "train.py", "train", "@recipes/x3.args", "--train-set", str(folder),
                   "--data-root", str(data_root), "--num-epoch", "1", "--checkpoint-dir", str(out), *flags]
        self.out, self.start, self.peak = out, time.perf_counter(), 0
        self.first_shown: tuple[float, int] | None = None  # (seconds from the start, steps)
        self.last_shown, self.text = (0.0, 0), ""
        self.proc = subprocess.Popen(command, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.watcher = threading.Thread(target=self.watch, daemon=True)
        self.watcher.start()

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:  # left paused or running by an error: it and its workers go
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def watch(self) -> None:  # the progress bar's steps, and when it showed them
        while chunk := self.proc.stderr.read1(4096):
            now = self.seconds()
            self.text = (self.text + chunk.decode(errors="replace"))[-4096:]
            if steps := [int(n) for n in re.findall(r"\|\s*(\d+)/\d+ \[", self.text) if int(n)]:
                self.first_shown = self.first_shown or (now, steps[-1])
                self.last_shown = (now, steps[-1])

    def run_until(self, done: Callable[[], bool]) -> None:
        """Let it run, sampling its memory, until `done()`; an end before that is an error. The
        samples are spaced so that taking them costs at most SAMPLER_SHARE of a core."""
        next_sample = 0.0
        while not done():
            if self.proc.poll() is not None:
                self.watcher.join()
                raise UserError(f"training on {self.out.name} ended early (exit status {self.proc.returncode}): "
                                + (self.text.strip().splitlines() or ["no output"])[-1])
            if (began := self.seconds()) >= next_sample:
                self.peak = max(self.peak, tree_memory_bytes(self.proc.pid))
                next_sample = began + (self.seconds() - began) / SAMPLER_SHARE
            time.sleep(0.25)

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)
        time.sleep(0.5)  # what the bar showed before the pause reaches the watcher

    def run_for(self, seconds: float) -> tuple[float, int]:
        """Continue it (paused) for `seconds`, then pause it again: (the seconds it ran, the steps it
        took meanwhile)."""
        os.killpg(self.proc.pid, signal.SIGCONT)
        began, steps = self.seconds(), self.last_shown[1]
        self.run_until(lambda: self.seconds() > began + seconds)
        ran = self.seconds() - began
        self.pause()
        return ran, self.last_shown[1] - steps

    def finish(self, stop: bool) -> dict:
        """Let it end its epoch, or (`stop`) have SIGTERM save where it stood: the checkpoint saved."""
        if stop:
            self.proc.send_signal(signal.SIGTERM)  # pending while paused, taken as it continues
        os.killpg(self.proc.pid, signal.SIGCONT)
        ended_as_asked = 128 + signal.SIGTERM if stop else 0  # train.py's exit status, saved either way
        self.run_until(lambda: self.proc.poll() == ended_as_asked)
        self.watcher.join()
        return torch.load(self.out / (INTERRUPTED if stop else LAST), weights_only=True)


def training_epoch(folder: Path, data_root: Path, out: Path, tree: Path = Path(__file__).parent,
                   flags: tuple[str, ...] = ()) -> dict:
    """One whole epoch of the x3 recipe (with `flags` after it) on `folder` (a TrainingRun): peak memory,
    patches per second and seconds of the epoch (as the run recorded them), seconds to its first step."""
    with TrainingRun(folder, data_root, out, tree, flags) as run:
        record = run.finish(stop=False)["history"][-1]
    return {"peak_memory_mb": round(run.peak / 1e6), "patches_per_s": round(record["patches_per_s"], 1),
            "seconds_per_epoch": round(record["seconds"], 3), "seconds_to_first_step": round(run.first_shown[0], 1)}


def data_benchmark(data_root: Path, count: int, size: tuple[int, int], seconds: float, rounds: int,
                   collection: Path | None) -> dict:
    """T91 (held in memory) against a collection of `count` images of `size` (streamed: DIV2K is
    6.6 GB of pixels, the default --data-memory 2 GB), each trained with the x3 recipe's settings,
    alternated so that both see the same machine, which may drift by a fifth within minutes: the
    collection's run starts and waits paused, then a T91 epoch and `seconds / rounds` of the
    collection take turns, `rounds` times, and a last T91 epoch closes. The collection's rate is its
    steps over the seconds it ran (its next part's read included, as every part of an epoch has one),
    T91's the mean of its epochs' (its peak memory their highest). The collection is made in
    `collection` (kept, and taken as it is when it holds `count` images) or in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = collection or Path(tmp) / "collection"
        folder.mkdir(parents=True, exist_ok=True)
        made = time.perf_counter()
        if len(list(folder.glob("*.png"))) != count:
            sources = [path for name in COLLECTION_SOURCES for path in list_images(data_root / name)]
            make_collection(folder, sources, count, size)
        made = time.perf_counter() - made
        t91, windows = [], []
        with TrainingRun(folder, data_root, Path(tmp) / "large") as large:
            large.run_until(lambda: large.first_shown is not None)
            large.pause()
            for i in range(rounds):
                t91.append(training_epoch(data_root / "T91", data_root, Path(tmp) / f"t91_{i}"))
                windows.append(large.run_for(seconds / rounds))
            t91.append(training_epoch(data_root / "T91", data_root, Path(tmp) / f"t91_{rounds}"))
            saved = large.finish(stop=True)
        pixels = sum(image_size(path)[0] * image_size(path)[1] for path in folder.glob("*.png"))
    steps_per_s = sum(steps for _, steps in windows) / sum(ran for ran, _ in windows)
    batch, first_step = saved["args"]["batch_size"], large.first_shown[0]
    collection_run = {"peak_memory_mb": round(large.peak / 1e6), "patches_per_s": round(steps_per_s * batch, 1),
                      "seconds_per_epoch": round(first_step + saved["position"]["batches"] / steps_per_s, 3),
                      "seconds_to_first_step": round(first_step, 1),
                      "windows_patches_per_s": [round(steps * batch / ran, 1) for ran, steps in windows]}
    t91_mean = {key: round(statistics.mean(run[key] for run in t91), 3) for key in t91[0]}
    t91_mean["peak_memory_mb"] = max(run["peak_memory_mb"] for run in t91)
    return {"collection": f"{count} images of {size[0]}x{size[1]}, {3 * pixels / 1e9:.2f} GB of pixels, "
                          f"made in {made:.0f} s", "t91": t91_mean, "collection_run": collection_run, "t91_runs": t91,
            "rate_vs_t91": round(collection_run["patches_per_s"] / t91_mean["patches_per_s"], 3)}


def alternated_epochs(data_root: Path, configs: dict[str, tuple[Path, tuple[str, ...]]], rounds: int) -> dict:
    """The x3 recipe's first epoch on T91 in each configuration (the tree whose train.py runs, the flags
    after the recipe), alternated `rounds` times so that all see the same machine: the whole training
    step as users run it (batches, passes, Adam, the moving average). The runs and median seconds."""
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            for name, (tree, flags) in configs.items():
                runs[name].append(training_epoch(data_root / "T91", data_root, Path(tmp) / f"{name}{i}", tree, flags))
    medians = {name: statistics.median(run["seconds_per_epoch"] for run in rs) for name, rs in runs.items()}
    return {"seconds_per_epoch": medians, "runs": runs}


def against_benchmark(data_root: Path, tree: Path, rounds: int) -> dict:
    """This tree's train.py against `tree`'s (e.g. a worktree of an older commit), alternated_epochs."""
    r = alternated_epochs(data_root, {"other": (tree, ()), "this": (Path(__file__).parent, ())}, rounds)
    seconds = r["seconds_per_epoch"]
    return {"tree": str(tree), **r, "speedup": round(seconds["other"] / seconds["this"], 3)}


def precision_benchmark(data_root: Path, rounds: int) -> dict:
    """This tree's x3 recipe in float32 (--amp off) and in bf16 (--amp bf16), alternated_epochs."""
    here = Path(__file__).parent
    r = alternated_epochs(data_root, {"float32": (here, ("--amp", "off")), "bf16": (here, ("--amp", "bf16"))}, rounds)
    seconds = r["seconds_per_epoch"]
    return {"tree": "float32", **r, "speedup": round(seconds["float32"] / seconds["bf16"], 3)}


def print_against_results(r: dict) -> None:
    for name in r["runs"]:
        label = {"other": r["tree"], "this": "this tree"}.get(name, name)
        seconds = [run["seconds_per_epoch"] for run in r["runs"][name]]
        print(f"x3 recipe, an epoch of T91 with {label}: median {r['seconds_per_epoch'][name]:.1f} s "
              f"({', '.join(f'{s:.1f}' for s in seconds)}; {r['runs'][name][-1]['patches_per_s']:.0f} patches/s)")
    first, second = r["runs"]
    print(f"{second} against {first}: {r['speedup']:.2f}x as fast")
    if second == "bf16" and r["speedup"] < 1:
        print("note: bf16 is slower than float32 on this machine: --amp bf16 trains in float32 here, as its probe "
              "at the start of a run finds", file=sys.stderr)


def print_data_results(r: dict) -> None:
    print(f"{'collection':35s} {r['collection']}")
    large = r["collection_run"]
    runs = ((f"T91 (held, mean of {len(r['t91_runs'])} epochs)", r["t91"]),
            (f"collection (streamed, {len(large['windows_patches_per_s'])} windows)", large))
    for name, run in runs:
        print(f"{name:35s} peak memory {run['peak_memory_mb']:,} MB, {run['patches_per_s']:.0f} patches/s, "
              f"{run['seconds_per_epoch']:,.0f} s an epoch, first step after {run['seconds_to_first_step']:.1f} s")
    print(f"{'in turn, patches/s':35s} " + ", ".join(
        f"T91 {t91['patches_per_s']:.0f}" + (f", collection {window:.0f}" if window else "")
        for t91, window in zip(r["t91_runs"], [*large["windows_patches_per_s"], None], strict=True)))
    print(f"{'the collection against T91':35s} {r['rate_vs_t91']:.0%} of its patches a second")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller memory test")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--cuda", action="store_true", help="time training, matmul and inference on the GPU")
    parser.add_argument("--data", action="store_true", help="instead: train the x3 recipe on T91 and on a DIV2K-"
                        "sized collection made from the downloaded sets in a temporary folder, 7 epochs of T91 and "
                        "6 windows of 150 s of the collection in turn (--quick: 40 images, 3 epochs and 2 windows "
                        "of 15 s), and compare memory and speed (about 30 minutes)")
    parser.add_argument("--against", type=Path, metavar="TREE", help="instead: the x3 recipe's first epoch on T91 "
                        "with this tree's train.py and with TREE's (e.g. `git worktree add /tmp/old <commit>`), "
                        "alternated 3 times (--quick: 1), and the speed-up (about 6 minutes) (default: none)")
    parser.add_argument("--bf16-epochs", action="store_true", help="instead: the x3 recipe's first epoch on T91 "
                        "in float32 and in bf16 (--amp off, --amp bf16), alternated 3 times (--quick: 1), and the "
                        "speed-up (about 4 minutes)")
    parser.add_argument("--data-root", default=default_data_root(), help="where T91, Set14 and BSD100 are")
    parser.add_argument("--collection", type=Path, metavar="DIR", help="with --data: make the collection here and "
                        "keep it, or take the one made there before (default: a temporary folder, removed after)")
    parser.add_argument("--network", type=filter_sizes, default=ASSIGNMENT.name, metavar="F1-F2-F3",
                        help="time training and the network of this shape, as train.py's flags of the same names "
                             "(end to end and memory: the shipped checkpoint.pth)")
    parser.add_argument("--widths", type=int, nargs=2, default=list(ASSIGNMENT.widths), metavar=("N1", "N2"),
                        help="the filters of the first two layers")
    parser.add_argument("--channels", choices=["rgb", "y"], default="rgb", help="RGB, or the Y channel")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.data:
        count, seconds, rounds = (40, 30, 2) if args.quick else (DIV2K_COUNT, 900, 6)  # 900 s: past a part (2 GB)
        results = data_benchmark(Path(args.data_root), count, DIV2K_SIZE, seconds, rounds, args.collection)
        print_data_results(results)
    elif args.against or args.bf16_epochs:
        data_root = Path(args.data_root).resolve()  # the other tree's train.py runs in that tree
        rounds = 1 if args.quick else 3
        results = (against_benchmark(data_root, args.against.resolve(), rounds) if args.against
                   else precision_benchmark(data_root, rounds))
        print_against_results(results)
    else:
        results = speed_benchmark(choose_device(args.cuda), shape_of_args(vars(args)), args.quick)
        print_results(results)
    if args.json:
        print(json.dumps(results, indent=2))


def measured(what: str, measure: Callable[[], T], figure: Callable[[T], str]) -> T:
    """Take one measure, saying on stderr what it measures as it starts and its figure as it ends: a
    whole run takes minutes, and its table comes only at the end."""
    print(f"{what} ...", end=" ", file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = measure()
    print(f"{figure(result)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return result


def slower_in_bf16(steps: dict) -> list[str]:
    """The steps (by size) whose bf16 took longer than their float32, in words: where --amp bf16's probe
    trains in float32."""
    return [f"{size} {steps[f'{size} bf16']:.1f} ms in bf16 against {ms:.1f} in float32"
            for name, ms in steps.items() if (size := name.removesuffix(" float32")) != name
            and steps.get(f"{size} bf16", 0) > ms]


def speed_benchmark(device: torch.device, shape: Shape, quick: bool) -> dict:
    """Training (train.py's loop against the textbook one, train.py's steps and where their time goes)
    and inference on `device`, each against the matmul rate, with warnings if the machine was busy."""
    reuse_freed_memory()  # as train.py's processes do: without it a step of large passes faulted its
    # activations in afresh (16 of 48x48 in passes of 15 + 1: 39 ms against 29 with it, AMD EPYC)
    start, busy_start, own_start = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
    ours, textbook = measured("training, train.py's loop against the textbook one", lambda: training_rates(
        device, *((2, 1024) if quick else (4, 4096)), shape), lambda r: f"{statistics.median(r[0]):.0f} against "
        f"{statistics.median(r[1]):.0f} patches/s")
    calls = 20 if quick else 40
    steps, passes = measured("train.py's steps", lambda: step_table(device, shape, calls),
                             lambda r: ", ".join(f"{name} {ms:.1f} ms" for name, ms in r[0].items()))
    shares = measured("where a step's time goes", lambda: {
        f"{batch}x{size}x{size}": {name: round(share, 3) for name, share in
                                   layer_shares(batch, size, device, calls, shape).items()}
        for batch, size, _ in STEPS}, lambda r: f"{len(r)} step(s)")
    peaks = measured("matmul", lambda: {"float32": matmul_gflops(3 if quick else 5, device), **(
        {"bf16": matmul_gflops(3 if quick else 5, device, torch.bfloat16)}
        if "bf16" in {name.split()[1] for name in steps} else {})},
        lambda r: ", ".join(f"{name} {rate:.0f} GFLOP/s" for name, rate in r.items()))
    megapixels = measured("inference in PyTorch", lambda: inference_megapixels(
        SRCNN(shape).to(device, memory_format=torch.channels_last).eval(), 1 if quick else 3), "{:.2f} MP/s".format)
    rss_size = 1000 if quick else 2000
    rss, rss_seconds = measured("super_resolve.py's peak memory", lambda: super_resolve_peak_rss(rss_size),
                                lambda r: f"{r[0]:.0f} MiB")
    cpu_model = (load_model(CHECKPOINT, torch.device("cpu"))[0] if shape == ASSIGNMENT  # ONNX Runtime runs on the
                 else SRCNN(shape).to(memory_format=torch.channels_last).eval())  # CPU: so does ours here
    network = measured("the network by engine", lambda: network_megapixels(cpu_model, 1 if quick else 3),
                       lambda r: ", ".join(f"{name} {rate:.2f} MP/s" for name, rate in r.items()))
    end_to_end = None if quick else measured(  # a small image times start-up, not the job
        "end to end, whole processes", lambda: end_to_end_seconds(1000, 3), lambda r: "done")
    busy_end = busy_cpu_seconds()
    others_share = None if busy_start is None or busy_end is None else (
        (busy_end[0] - busy_start[0] - (own_cpu_seconds() - own_start)) / ((time.perf_counter() - start) * busy_end[1])
    )
    return speed_results(device, shape, ours, textbook, steps, passes, shares, peaks, megapixels, network,
                         end_to_end, (rss_size, rss, rss_seconds), others_share)


def speed_results(device: torch.device, shape: Shape, ours: list[float], textbook: list[float], steps: dict,
                  passes: dict, shares: dict, peaks: dict, megapixels: float, network: dict, end_to_end: dict | None,
                  super_resolve: tuple[int, float, float], others_share: float | None) -> dict:
    """The speed benchmark's figures as plain data, each rate also as a share of the matmul rate (a
    step's of the matmul rate in its own precision)."""
    peak = peaks["float32"]
    our_rate, textbook_rate = statistics.median(ours), statistics.median(textbook)
    achieved = our_rate * training_flops_per_patch(shape) / 1e9
    network_share = {name: rate * 1e6 * 2 * sum(layer_macs(shape)) / 1e9 / peak for name, rate in network.items()}
    return {
        "machine": (torch.cuda.get_device_name(device) if device.type == "cuda" else
                    f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
        + f", torch {torch.__version__}",
        "network": str(shape),
        "train_patches_per_s_ours": round(our_rate, 1),
        "train_patches_per_s_textbook": round(textbook_rate, 1),
        "speedup_vs_textbook": round(our_rate / textbook_rate, 2),
        "step_ms": steps,
        "step_fraction_of_matmul": {step: round(int(step.split("x")[0]) * training_flops_per_patch(
            shape, int(step.split("x")[1])) / (ms / 1000) / 1e9 / peaks[step.split()[1]], 3)
            for step, ms in steps.items()},
        "step_passes": passes,
        "layer_shares": shares,
        "textbook_step_ms_128x33x33": round(1000 * BATCH / textbook_rate, 2),
        "train_gflops": round(achieved, 1),
        "matmul_gflops": round(peak, 1),
        "matmul_gflops_by_precision": {name: round(rate, 1) for name, rate in peaks.items()},
        "fraction_of_matmul_peak": round(achieved / peak, 3),
        "inference_megapixels_per_s": round(megapixels, 2),
        "network_megapixels_per_s": {name: round(rate, 2) for name, rate in network.items()},
        "network_fraction_of_matmul": {name: round(share, 3) for name, share in network_share.items()},
        "end_to_end": end_to_end,
        "super_resolve_lr_size": super_resolve[0],
        "super_resolve_peak_rss_mib": round(super_resolve[1], 1),
        "super_resolve_seconds": round(super_resolve[2], 1),
        "warnings": reliability_warnings(ours, textbook, others_share, {
            "training": achieved / peak, **{f"the network ({name})": share for name, share in network_share.items()}}),
    }


def print_results(results: dict) -> None:
    r = results
    print(f"machine                          {r['machine']}")
    print(f"network                          SRCNN {r['network']}")
    print(f"training, patches/s (33x33, b128) ours {r['train_patches_per_s_ours']:.0f}  "
          f"textbook {r['train_patches_per_s_textbook']:.0f}  ratio {r['speedup_vs_textbook']:.2f}x")
    print("matmul GFLOP/s                   " + ", ".join(
        f"{name} {rate:.0f}" for name, rate in r["matmul_gflops_by_precision"].items()))
    for step, ms in r["step_ms"].items():
        patches, why = r["step_passes"][step]
        size, precision = step.split()[:2]
        print(f"train.py step, {step:22s} {ms:6.2f} ms ({int(step.split('x')[0]) * 1000 / ms:.0f} patches/s, "
              f"{r['step_fraction_of_matmul'][step]:.0%} of {precision} matmul), passes of at most {patches} ({why})"
              + (f"; textbook loop {r['textbook_step_ms_128x33x33']:.1f} ms" if step == "128x33x33 float32" else ""))
        if step == f"{size} float32" and size in r["layer_shares"]:
            print("  layer shares                   " + ", ".join(f"{name} {share:.0%}"
                                                               for name, share in r["layer_shares"][size].items()))
    print(f"training GFLOP/s                 {r['train_gflops']:.1f} of matmul {r['matmul_gflops']:.1f} "
          f"({r['fraction_of_matmul_peak']:.0%})")
    print(f"inference (512x512 LR -> x3)     {r['inference_megapixels_per_s']:.2f} megapixels/s")
    print("network on 1536x1536, CPU        " + "  ".join(
        f"{name} {rate:.2f} MP/s ({r['network_fraction_of_matmul'][name]:.0%} of matmul)"
        for name, rate in r["network_megapixels_per_s"].items()) + ("" if "onnxruntime" in r["network_megapixels_per_s"]
                                                                   else "  (ONNX Runtime not installed)"))
    if not r["end_to_end"]:
        print("end to end, whole processes      not measured: needs ONNX Runtime and a full run (--quick's small "
              "image would time start-up, not the job)")
    else:
        e = r["end_to_end"]
        ours, minimal = e["seconds"]["super_resolve.py"], e["seconds"]["minimal script"]
        print(f"end to end, whole processes      super_resolve.py {ours:.1f} s, minimal Pillow + ONNX Runtime script "
              f"{minimal:.1f} s (ratio {ours / minimal:.2f}); PNG {e['bytes']['ours']:,} vs {e['bytes']['minimal']:,}"
              f" bytes; outputs differ by at most {e['largest_difference']} level(s)")
    size = r["super_resolve_lr_size"]
    print(f"super_resolve.py {size}x{size} LR     peak RSS {r['super_resolve_peak_rss_mib']:.0f} MiB, "
          f"{r['super_resolve_seconds']:.1f} s")
    for warning in r["warnings"]:
        print(f"warning: {warning}; these figures are not the machine's own, run again when it is idle",
              file=sys.stderr)
    if slower := slower_in_bf16(r["step_ms"]):
        print(f"note: bf16 is slower than float32 on this machine ({'; '.join(slower)}): --amp bf16 trains in "
              "float32 here, as its probe at the start of a run finds", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
