"""Benchmark: training and inference speed on this machine, in one run.

    python bench.py            # full run (a few minutes)
    python bench.py --quick    # short run
    python bench.py --json     # also print the figures as JSON

Training throughput of train.py's own step is measured against a textbook loop (a Dataset that
returns one float32 patch pair per item, a shuffling DataLoader, default memory format), the two
alternating in one run, so the ratio holds whatever else the machine does.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from inference import enhance, export_onnx, super_resolve_image
from model import SRCNN
from train import CPU_CHUNK, make_batch, train_step
from utils import HelpFormatter, UserError, choose_device, run_cli

PATCH, BATCH = 33, 128


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


def textbook_epoch(inputs: torch.Tensor, targets: torch.Tensor, device: torch.device) -> float:
    model = SRCNN().to(device)
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


def our_epoch(inputs: torch.Tensor, targets: torch.Tensor, device: torch.device) -> float:
    """train.py's own path: uint8 patches held on the device, make_batch, channels_last, train_step."""
    model = SRCNN().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    inputs, targets = inputs.to(device), targets.to(device)
    synchronize(device)
    start = time.perf_counter()
    for index in torch.randperm(len(inputs), device=device).split(BATCH):
        x, y = make_batch(inputs, targets, index, 0)
        train_step(model, optimizer, x, y, chunk=CPU_CHUNK if device.type == "cpu" else None)
    synchronize(device)
    return len(inputs) / (time.perf_counter() - start)


def training_flops_per_patch(size: int = PATCH) -> float:
    """Convolution FLOPs of one patch's forward + backward pass, counting what is computed:
    forward and weight gradient of every layer, input gradient of all but the first."""
    model = SRCNN()
    flops = 0.0
    for i, conv in enumerate((model.conv1, model.conv2, model.conv3)):
        macs = conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] * size * size
        flops += 2 * macs * (2 if i == 0 else 3)
    return flops


def matmul_gflops(seconds: float, device: torch.device) -> float:
    a, b = torch.rand(2048, 2048, device=device), torch.rand(2048, 2048, device=device)
    torch.mm(a, b)
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    synchronize(device)
    return count * 2 * 2048**3 / (time.perf_counter() - start) / 1e9


def inference_megapixels(model: SRCNN, repeats: int) -> float:
    image = Image.fromarray(torch.randint(0, 256, (512, 512, 3), dtype=torch.uint8).numpy())
    super_resolve_image(model, image, 3)
    start = time.perf_counter()
    for _ in range(repeats):
        out = super_resolve_image(model, image, 3)  # ends with the output on the CPU: synchronised
    return repeats * out.width * out.height / (time.perf_counter() - start) / 1e6


def network_megapixels(model: SRCNN, repeats: int, size: int = 1536) -> tuple[float, float | None]:
    """Megapixels/s of the network on one size x size input: our inference path (enhance: tiles,
    8-bit output) and ONNX Runtime on the exported model (None without onnxruntime/onnxscript)."""
    x = torch.rand(3, size, size).mul(255).to(torch.uint8)
    enhance(model, x)
    start = time.perf_counter()
    for _ in range(repeats):
        enhance(model, x)
    ours = repeats * size * size / (time.perf_counter() - start) / 1e6
    try:
        import onnxruntime
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(model, Path(tmp) / "srcnn.onnx")
            session = onnxruntime.InferenceSession(str(Path(tmp) / "srcnn.onnx"), providers=["CPUExecutionProvider"])
    except (ImportError, UserError):
        return ours, None
    feed = {"input": x.float().div(255).unsqueeze(0).numpy()}
    session.run(None, feed)
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(None, feed)
    return ours, repeats * size * size / (time.perf_counter() - start) / 1e6


def super_resolve_peak_rss(size: int) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `python super_resolve.py` on a size x size LR image."""
    with tempfile.TemporaryDirectory() as tmp:
        weights, lr = Path(tmp) / "w.pth", Path(tmp) / "lr.png"
        torch.save(SRCNN().state_dict(), weights)
        Image.effect_noise((size, size), 64).convert("RGB").save(lr)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, str(Path(__file__).with_name("super_resolve.py")), "--checkpoint", str(weights), str(lr)],
            check=True, capture_output=True,
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


def reliability_warnings(ours: list[float], textbook: list[float], others_share: float | None) -> list[str]:
    """Why this run's figures may not be the machine's: repeats that disagree, or a busy CPU."""
    warnings = []
    for name, rates in (("train.py", ours), ("textbook", textbook)):
        spread = (max(rates) - min(rates)) / statistics.median(rates)
        if spread > 0.10:
            warnings.append(f"the {name} loop's repeats differ by {spread:.0%}: the machine's speed changed")
    if others_share is not None and others_share > 0.10:
        warnings.append(f"other processes used {others_share:.0%} of the CPU during the run")
    return warnings


def training_rates(device: torch.device, rounds: int, patches: int) -> tuple[list[float], list[float]]:
    """Patches per second of train.py's loop and of the textbook loop, `rounds` each, alternated so
    that both see the same machine."""
    torch.manual_seed(0)
    inputs = torch.randint(0, 256, (patches, 3, PATCH, PATCH), dtype=torch.uint8)
    targets = torch.randint(0, 256, (patches, 3, PATCH, PATCH), dtype=torch.uint8)
    ours, textbook = [], []
    our_epoch(inputs[:256], targets[:256], device)  # warm-up
    textbook_epoch(inputs[:256], targets[:256], device)
    for _ in range(rounds):
        ours.append(our_epoch(inputs, targets, device))
        textbook.append(textbook_epoch(inputs, targets, device))
    return ours, textbook


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller memory test")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--cuda", action="store_true", help="time training, matmul and inference on the GPU")
    args = parser.parse_args(argv)
    device = choose_device(args.cuda)
    start, busy_start, own_start = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
    ours, textbook = training_rates(device, *((2, 1024) if args.quick else (4, 4096)))
    peak = matmul_gflops(2 if args.quick else 5, device)
    our_rate, textbook_rate = statistics.median(ours), statistics.median(textbook)
    achieved = our_rate * training_flops_per_patch() / 1e9
    megapixels = inference_megapixels(SRCNN().to(device, memory_format=torch.channels_last).eval(),
                                      1 if args.quick else 3)
    rss_size = 1000 if args.quick else 2000
    rss, rss_seconds = super_resolve_peak_rss(rss_size)  # first: the ONNX export may start children of its own
    cpu_model = SRCNN().to(memory_format=torch.channels_last).eval()  # ONNX Runtime runs on the CPU: so does ours
    network, onnx_runtime = network_megapixels(cpu_model, 1 if args.quick else 3)
    busy_end = busy_cpu_seconds()
    others_share = None if busy_start is None or busy_end is None else (
        (busy_end[0] - busy_start[0] - (own_cpu_seconds() - own_start)) / ((time.perf_counter() - start) * busy_end[1])
    )
    results = {
        "machine": (torch.cuda.get_device_name(device) if device.type == "cuda" else
                    f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
        + f", torch {torch.__version__}",
        "train_patches_per_s_ours": round(our_rate, 1),
        "train_patches_per_s_textbook": round(textbook_rate, 1),
        "speedup_vs_textbook": round(our_rate / textbook_rate, 2),
        "train_gflops": round(achieved, 1),
        "matmul_gflops": round(peak, 1),
        "fraction_of_matmul_peak": round(achieved / peak, 3),
        "inference_megapixels_per_s": round(megapixels, 2),
        "network_megapixels_per_s_ours": round(network, 2),
        "network_megapixels_per_s_onnxruntime": None if onnx_runtime is None else round(onnx_runtime, 2),
        "super_resolve_lr_size": rss_size,
        "super_resolve_peak_rss_mib": round(rss, 1),
        "super_resolve_seconds": round(rss_seconds, 1),
        "warnings": reliability_warnings(ours, textbook, others_share),
    }
    print_results(results, args.json)


def print_results(results: dict, as_json: bool) -> None:
    r = results
    print(f"machine                          {r['machine']}")
    print(f"training, patches/s (33x33, b128) ours {r['train_patches_per_s_ours']:.0f}  "
          f"textbook {r['train_patches_per_s_textbook']:.0f}  ratio {r['speedup_vs_textbook']:.2f}x")
    print(f"training GFLOP/s                 {r['train_gflops']:.1f} of matmul {r['matmul_gflops']:.1f} "
          f"({r['fraction_of_matmul_peak']:.0%})")
    print(f"inference (512x512 LR -> x3)     {r['inference_megapixels_per_s']:.2f} megapixels/s")
    onnx_runtime = r["network_megapixels_per_s_onnxruntime"]
    print(f"network on 1536x1536, CPU        ours {r['network_megapixels_per_s_ours']:.2f} megapixels/s  "
          + ("ONNX Runtime not installed" if onnx_runtime is None else f"ONNX Runtime {onnx_runtime:.2f}"))
    size = r["super_resolve_lr_size"]
    print(f"super_resolve.py {size}x{size} LR     peak RSS {r['super_resolve_peak_rss_mib']:.0f} MiB, "
          f"{r['super_resolve_seconds']:.1f} s")
    for warning in r["warnings"]:
        print(f"warning: {warning}; these figures are not the machine's own, run again when it is idle",
              file=sys.stderr)
    if as_json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_cli(main)
