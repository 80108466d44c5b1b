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
import json
import statistics
import time
from pathlib import Path

import interrupts  # noqa: F401  (first: Ctrl-C while torch loads ends in one line)

import torch

from bench_figures import busy_cpu_seconds, measured, own_cpu_seconds, print_results, speed_results
from bench_inference import (
    CHECKPOINT,
    end_to_end_seconds,
    inference_megapixels,
    network_megapixels,
    super_resolve_peak_rss,
)
from bench_runs import (
    DIV2K_COUNT,
    DIV2K_SIZE,
    against_benchmark,
    data_benchmark,
    precision_benchmark,
    print_against_results,
    print_data_results,
)
from bench_step import STEPS, layer_shares, matmul_gflops, step_table, training_rates
from checkpoint import load_model, shape_of_args
from download import default_data_root
from model import ASSIGNMENT, SRCNN, Shape
from options import filter_sizes
from processes import reuse_freed_memory
from utils import HelpFormatter, choose_device, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller memory test")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--cuda", action="store_true", help="time training, matmul and inference on the GPU")
    parser.add_argument("--data", action="store_true", help="instead: train the x3 recipe on T91 and on a DIV2K-"
                        "sized collection made from the downloaded sets in a temporary folder, 7 epochs of T91 and "
                        "6 windows of 150 s of the collection in turn (--quick: 40 images, 3 epochs and 2 windows "
                        "of 15 s), and compare memory and speed (the longest of these runs: docs/speed.md)")
    parser.add_argument("--against", type=Path, metavar="TREE", help="instead: the x3 recipe's first epoch on T91 "
                        "with this tree's train.py and with TREE's (e.g. `git worktree add /tmp/old <commit>`), "
                        "alternated 3 times (--quick: 1), and the speed-up (default: none)")
    parser.add_argument("--bf16-epochs", action="store_true", help="instead: the x3 recipe's first epoch on T91 "
                        "in float32 and in bf16 (--amp off, --amp bf16), alternated 3 times (--quick: 1), and the "
                        "speed-up")
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



def speed_benchmark(device: torch.device, shape: Shape, quick: bool) -> dict:
    """Training (train.py's loop against the textbook one, train.py's steps and where their time goes)
    and inference on `device`, each against the matmul rate, with warnings if the machine was busy."""
    reuse_freed_memory()  # as train.py's processes do: without it a step of large passes faulted its
    # activations in afresh every step (docs/speed.md, "The step as it is now, per kind of machine")
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




if __name__ == "__main__":
    run_cli(main)
