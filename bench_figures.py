"""How bench.py's figures are taken, trusted and printed: each measure said as it starts and ends,
warnings where the machine was busy or the repeats disagree, the results as plain data and as
the table `python bench.py` prints."""

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from bench_step import BATCH, layer_macs, slower_in_bf16, training_flops_per_patch
from model import Shape

T = TypeVar("T")

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



def measured(what: str, measure: Callable[[], T], figure: Callable[[T], str]) -> T:
    """Take one measure, saying on stderr what it measures as it starts and its figure as it ends: a
    whole run takes minutes, and its table comes only at the end."""
    print(f"{what} ...", end=" ", file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = measure()
    print(f"{figure(result)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return result



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

