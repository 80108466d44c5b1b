"""bench.py's first question: how fast train.py's own step trains, against a textbook loop (a Dataset
that returns one float32 patch pair per item, a shuffling DataLoader, default memory format, the
two alternating in one run so that their ratio holds whatever else the machine does) and against
the matmul rate in its precision, and where the step's time goes layer by layer."""

import copy
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from data import rgb_to_y
from model import SRCNN, Shape, conv_by_phase
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
from utils import UserError

PATCH, BATCH = 33, 128  # the assignment's patches and batch: the textbook loop's

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



def slower_in_bf16(steps: dict) -> list[str]:
    """The steps (by size) whose bf16 took longer than their float32, in words: where --amp bf16's probe
    trains in float32."""
    return [f"{size} {steps[f'{size} bf16']:.1f} ms in bf16 against {ms:.1f} in float32"
            for name, ms in steps.items() if (size := name.removesuffix(" float32")) != name
            and steps.get(f"{size} bf16", 0) > ms]
