"""The training options: every flag of `train` and `resume`, its default and what it means, the
range each must lie in (checked before any work), and how a recipe file (recipes/*.args) is read."""

import argparse
import math
import re
import shlex
from collections.abc import Callable
from pathlib import Path

from checkpoint import training_sets
from data import DEGRADATIONS
from download import default_data_root
from model import ASSIGNMENT, Shape
from utils import UserError


def add_training_flags(parser: argparse.ArgumentParser, resume: bool) -> None:
    """The training flags; for `resume` they default to 'not given' so the saved values stand."""

    def flag(*names, **kwargs):
        if resume:  # the device is chosen anew by every run
            kwargs["default"] = argparse.SUPPRESS
            kwargs["help"] += " (default: off)" if names[0] == "--cuda" else " (default: as saved)"
        parser.add_argument(*names, **kwargs)

    add_run_flags(flag)
    add_data_flags(flag)
    add_network_flags(flag)


def add_run_flags(flag: Callable[..., None]) -> None:
    """How long and how fast a run trains, where it writes, and on what."""
    flag("--cuda", action="store_true", help="train on the GPU")
    flag("--lr", type=float, default=1e-4, help="Adam learning rate")
    flag("--batch-size", type=int, default=128, help="patches per step")
    flag("--num-epoch", type=epochs, default=100, metavar="E",
         help="train until this many epochs in total; a fraction ends the last epoch early, after that share of "
              "its batches (e.g. 7.5), and the warm-up and cosine schedule end with it")
    flag("--save-freq", type=int, default=10, help="write checkpoint.<epoch>.pth every N epochs")
    flag("--scale", type=int, default=3, help="upscaling factor")
    flag("--seed", type=int, default=0, help="random seed")
    flag("--checkpoint-dir", default="checkpoints", help="where checkpoints go")
    flag("--lr-decay", choices=["none", "cosine"], default="none", help="learning-rate schedule")
    flag("--min-lr", type=float, default=1e-6, help="final learning rate of the cosine schedule")
    flag("--warmup", type=float, default=1.0, help="epochs of linear learning-rate warm-up at the start")
    flag("--ema-decay", type=float, default=0.0, metavar="D",
         help="evaluate and save a moving average of the weights, updated every step with this decay (0: off)")
    flag("--amp", nargs="?", const="bf16", choices=["off", "bf16", "fp16"], default="off",
         help="the forward pass in mixed precision: --amp (bf16) on CUDA or on a CPU that computes bfloat16 natively "
              "(AVX512_BF16 or AMX; elsewhere a note and float32), or --amp fp16 on CUDA; the loss, weights and "
              "Adam stay float32")
    flag("--cuda-graph", choices=["auto", "off"], default="off",
         help="on one GPU, the step captured as a CUDA graph after 3 plain batches and kept if it then makes the "
              "plain step's update (auto), or the plain step always (off: until the captured step has passed the "
              "GPU suite, docs/gpus.md)")
    flag("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
         help="write the run's curves, an evaluation image's crop every --tensorboard-images epochs, its command "
              "line and arguments for TensorBoard into DIR (--tensorboard alone: CHECKPOINT_DIR/tensorboard), "
              "recorded, so that resume writes on into it (default: none)")
    flag("--tensorboard-images", type=int, default=1, metavar="N",
         help="with --tensorboard, show the evaluation crop every N epochs (0: never)")
    flag("--pass-patches", type=int, default=None, metavar="N",
         help="on a CPU, the most patches a forward/backward pass takes, the batch in passes of equal size "
              "(default: chosen for this CPU, and recorded)")


def add_data_flags(flag: Callable[..., None]) -> None:
    """What a run trains and evaluates on, and how its patches are cut, shrunk and held."""
    flag("--data-root", default=default_data_root(), help="folder with one folder per set")
    flag("--train-set", nargs="+", default=["T91"], metavar="SET",
         help="training set folder(s): names under --data-root, or paths, e.g. T91 ~/photos")
    flag("--eval-set", default="Set5", help="evaluation set folder")
    flag("--patch-size", type=int, default=33, help="training patch size")
    flag("--stride", type=int, default=14, help="patch grid stride")
    flag("--augment", action="store_true", help="random flips/rotations of each batch")
    flag("--fresh-crops", action="store_true", help="move the patch grid to a random offset every epoch")
    flag("--loss-border", type=int, default=0,
         help="leave this many pixels at each patch edge out of the loss (6: only pixels zero padding cannot reach)")
    flag("--degradation", choices=[*DEGRADATIONS, "mixed"], default="pil",
         help="bicubic of the inputs: Pillow's, MATLAB's imresize, or per image one of the two each epoch")
    flag("--zooms", type=float, nargs="+", default=[1.0], metavar="Z",
         help="train on every training image shrunk by each factor, e.g. 1 0.9 0.8 0.7 0.6 (1: as it is)")
    flag("--data-memory", type=byte_size, default="2GB", metavar="SIZE",
         help="the most memory the training images may take (8-bit pixels, each zoom a copy), e.g. 500MB or 8GB; "
              "a larger set is streamed a part at a time; at least what the largest image takes")
    flag("--workers", type=int, default=2, help="processes that read the next part of a streamed set while one trains")


def add_network_flags(flag: Callable[..., None]) -> None:
    """The network's shape (model.Shape) and where its weights start."""
    flag("--network", type=filter_sizes, default=ASSIGNMENT.name, metavar="F1-F2-F3",
         help="the three layers' filter sizes, odd, e.g. 9-5-5 or 9-3-5 (the paper's studies)")
    flag("--widths", type=int, nargs=2, default=list(ASSIGNMENT.widths), metavar=("N1", "N2"),
         help="the filters of the first two layers, e.g. 128 64")
    flag("--channels", choices=["rgb", "y"], default="rgb",
         help="what the network maps: RGB, or the Y channel (BT.601) as the paper's main tables, Cb and Cr "
              "then taken from the bicubic input")
    flag("--init", default="default", metavar="{default,identity,CHECKPOINT}",
         help="starting weights: PyTorch's default, the identity mapping, or a checkpoint's "
              "(e.g. checkpoint.pth, the x3 model, to train x2 or x4 from)")


BYTE_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_bytes(text: str) -> int:
    """'2GB' -> 2,000,000,000 (KB, MB, GB, TB decimal; KiB, MiB, GiB, TiB binary; B optional)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]I?)?B?\s*", text.upper())
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return int(float(match.group(1)) * BYTE_UNITS[match.group(2) or ""])


def byte_size(text: str) -> str:
    """--data-memory's value, kept as written (the checkpoint records it so), checked to be a size."""
    try:
        parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB or 500MB, not {text!r}") from None
    return text


def epochs(text: str) -> int | float:
    """--num-epoch's value: a whole number of epochs, or a fraction of one more (kept as written)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of epochs such as 20 or 7.5, not {text!r}") from None
    return int(value) if value.is_integer() else value


def filter_sizes(text: str) -> str:
    """--network's value: three odd filter sizes joined by '-', as the paper names its networks."""
    try:
        return Shape(tuple(int(k) for k in text.split("-"))).name
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three odd filter sizes such as 9-5-5, not {text!r}") from None


SEED_MAX = 2**32 - 1  # the largest seed numpy's generator takes

# One rule per numeric training flag: (holds for the flag's value in these arguments, what it must be).
# check_training_args applies them before any work; tests/test_errors.py walks each through its bounds.
RULES: dict[str, tuple[Callable[[dict], bool], str]] = {
    "lr": (lambda a: 0 < a["lr"] < math.inf, "must be a positive number"),
    "min_lr": (lambda a: 0 <= a["min_lr"] < math.inf and (a["lr_decay"] != "cosine" or a["min_lr"] <= a["lr"]),
               "must be at least 0, and at most --lr with --lr-decay cosine"),
    "warmup": (lambda a: 0 <= a["warmup"] < math.inf, "must be a number of epochs, at least 0"),
    "ema_decay": (lambda a: 0 <= a["ema_decay"] < 1, "must lie in [0, 1)"),
    "batch_size": (lambda a: a["batch_size"] >= 1, "must be at least 1"),
    "num_epoch": (lambda a: 0 < a["num_epoch"] < math.inf, "must be a positive number of epochs"),
    "save_freq": (lambda a: a["save_freq"] >= 1, "must be at least 1"),
    "seed": (lambda a: 0 <= a["seed"] <= SEED_MAX, f"must lie in [0, {SEED_MAX}]"),
    "patch_size": (lambda a: a["patch_size"] >= 1, "must be at least 1"),
    "stride": (lambda a: a["stride"] >= 1, "must be at least 1"),
    "scale": (lambda a: 2 <= a["scale"] <= a["patch_size"],
              "must be at least 2 and at most --patch-size (a patch holds at least one low-resolution pixel)"),
    "loss_border": (lambda a: 0 <= a["loss_border"] < a["patch_size"] // 2,
                    "must be at least 0 and less than half the patch size"),
    "zooms": (lambda a: all(0 < z <= 1 for z in a["zooms"]),
              "must lie in (0, 1]: the training images are only ever shrunk"),
    "widths": (lambda a: all(n >= 1 for n in a["widths"]), "must be at least 1"),
    "workers": (lambda a: a["workers"] >= 0, "must be at least 0 (0: read in the training process)"),
    "pass_patches": (lambda a: a["pass_patches"] is None or a["pass_patches"] >= 1, "must be at least 1"),
    "tensorboard_images": (lambda a: a["tensorboard_images"] >= 0, "must be at least 0 (0: no pictures)"),
}


def check_training_args(args: dict) -> None:
    """Every training flag within its range (RULES), so a bad value ends in one line naming the flag,
    before any data is read, not deep in training."""
    for key, (holds, must) in RULES.items():
        if not holds(args):
            raise UserError(f"--{key.replace('_', '-')} {must}")


def recipe_line_to_args(line: str) -> list[str]:
    """A line of an argument file (`train.py train @recipes/x3.args`) as the shell would split it,
    '#' to the end of the line a comment."""
    return shlex.split(line, comments=True)


def training_folders(args: dict) -> list[Path]:
    """The --train-set folders: each a name under --data-root, or else a path to a folder; one named
    twice (by name or by path) ends in one line, since its patches would count twice."""
    root = Path(args["data_root"])
    folders = [root / name if (root / name).is_dir() or not Path(name).is_dir() else Path(name)
               for name in training_sets(args)]
    resolved = [folder.resolve() for folder in folders]
    if len(set(resolved)) < len(resolved):
        twice = next(folder for folder, path in zip(folders, resolved, strict=True) if resolved.count(path) > 1)
        raise UserError(f"--train-set names {twice} twice; each folder's patches would count twice")
    return folders
