"""bench.py's third question: whole training runs compared, each in a train.py process of its own: T91
against a DIV2K-sized collection that is streamed (--data), this tree against another (--against),
float32 against bf16 (--bf16-epochs); their memory, rates and first steps."""

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from checkpoint import INTERRUPTED, LAST
from data import image_size, list_images, load_rgb
from utils import UserError

# ---------------------------------------------------------------- --data: training on a large collection

DIV2K_COUNT, DIV2K_SIZE = 800, (2040, 1356)  # DIV2K's training set: 800 images of about 2040 x 1356
COLLECTION_SOURCES = ("BSD100", "Set14", "T91")  # what its pictures are cut from
# The memory sampler's most of one core. A read of a streamed run's proportional set size walks
# its 2-3 GB of pages in the kernel, so that reading it often took a share of a core from the very
# steps measured (docs/training.md, "Training on more data").
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
