"""What a checkpoint is: its format, the one writer and the one reader, the network it describes,
the shipped models, the checks before `resume`, and the command lines it records.

A checkpoint is a plain dict of tensors and plain data (docs/checkpoints.md):

    model             the weights to use: with --ema-decay their moving average, else the trained weights
    training_weights  with --ema-decay, the weights Adam trains (what `resume` continues); else None
    optimizer         Adam's state_dict
    scaler            with --amp fp16 on CUDA, the loss scaler's state; else None
    args              every training argument, expanded (the flags of `train`, by their dest names); its
                      `network` ("9-5-5"), `widths` ([64, 32]) and `channels` ("rgb" or "y") are
                      the network's shape; without them it is the assignment's 9-1-5, 64/32, RGB;
                      `bf16_probe` ({"float32_ms", "bf16_ms"}), with --amp bf16 on a CPU, what decided
                      its precision (step.bf16_probe), kept by `resume`
    epoch             epochs done
    history           one dict per epoch: epoch, loss, psnr, ssim, lr, seconds, patches_per_s
    best_psnr         the best evaluation PSNR so far
    rng               {"torch": the global RNG state, "generator": the state of the draws of crops and flips}
    scale, version    the upscaling factor; the project's version that wrote it
    commands          {"epoch", "command", "step", "precision"} of every train/resume command line that
                      made it: "step" the training step it took, in words, "precision" its forward
                      pass's (float32, bf16, fp16); both recorded since issues 59 and 61
    position          in interrupted.pth only: where the epoch after `epoch` stopped (POSITION_KEYS)

A bare state_dict of the three convolutions (conv1..conv3) is read as a model of the shape its
weights have, at the scale the user gives (--scale), x3 by default: the published weights of other
SRCNN ports load as they are.
"""

import math
import os
import re
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import info
from files import atomic_write
from model import ASSIGNMENT, SRCNN, Shape
from utils import UserError

RESUME_KEYS = ("model", "optimizer", "args", "epoch", "history", "best_psnr", "rng", "scale", "version")
POSITION_KEYS = {"batch", "batches", "loss_sum", "seconds"}
DEFAULT_SCALE = 3  # what a checkpoint without a scale (a bare state_dict) is taken to be

LAST, BEST, INTERRUPTED = "last.pth", "best.pth", "interrupted.pth"  # the files a run writes into its folder

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ShippedModel:
    """A trained model this project ships: its file, the recipe (recipes/) whose one command trained
    it, and its Y-PSNR on Set5, Set14 and BSD100 (Pillow's bicubic), as the README's table gives them."""

    path: Path
    recipe: str
    scores: tuple[float, float, float]


# The one list of the shipped models, by the network --model names (its filter sizes) and scale: the
# README's tables, docs and tests read it from here (tests/test_shipped_model.py).
SHIPPED_MODELS = {
    ("915", 2): ShippedModel(HERE / "models" / "srcnn_x2.pth", "x2.args", (36.47, 32.31, 31.14)),
    ("915", 3): ShippedModel(HERE / "checkpoint.pth", "x3.args", (32.59, 29.17, 28.24)),
    ("915", 4): ShippedModel(HERE / "models" / "srcnn_x4.pth", "x4.args", (30.32, 27.40, 26.75)),
    ("955", 2): ShippedModel(HERE / "models" / "srcnn_955_x2.pth", "955y_x2.args", (36.80, 32.53, 31.36)),
    ("955", 3): ShippedModel(HERE / "models" / "srcnn_955_x3.pth", "955y_x3.args", (32.88, 29.41, 28.44)),
    ("955", 4): ShippedModel(HERE / "models" / "srcnn_955_x4.pth", "955y_x4.args", (30.54, 27.61, 26.92)),
}
SHIPPED = {key: model.path for key, model in SHIPPED_MODELS.items()}  # each one's file
SHIPPED_NETWORKS = tuple(dict.fromkeys(network for network, _ in SHIPPED))  # --model's choices, 915 first
MODEL_HELP = ("without a checkpoint, the shipped model of this network and --scale: " + "; ".join(
    f"{n} ({n[0]}-{n[1]}-{n[2]}) at x{', x'.join(str(s) for m, s in SHIPPED if m == n)}" for n in SHIPPED_NETWORKS)
    + " (default: 915, the assignment's)")


def numbered(epoch: int) -> str:
    """The file that --save-freq keeps of an epoch."""
    return f"checkpoint.{epoch}.pth"


RUN_FILE = re.compile(r"(last|best|interrupted|checkpoint\.\d+)\.pth")  # LAST, BEST, INTERRUPTED, numbered


def run_files(folder: Path) -> list[str]:
    """The checkpoints a run wrote into `folder`, by name: a new run there would replace them."""
    return sorted(p.name for p in folder.iterdir() if RUN_FILE.fullmatch(p.name)) if folder.is_dir() else []


def earlier_run(folder: Path, overwrite: bool) -> list[str]:
    """The checkpoints an earlier run left in `folder`, which a new run there would replace: refused
    in one line (before any work) that names the command continuing it, unless `overwrite`."""
    held = run_files(folder)
    if held and not overwrite:
        raise UserError(f"{folder} already holds a run ({', '.join(held)}): continue it with `python train.py "
                        f"resume {shlex.quote(str(latest_in(folder, held)))}`, train into another --checkpoint-dir, "
                        "or add --overwrite to start over and replace it")
    return held


def latest_in(folder: Path, held: list[str]) -> Path:
    """The checkpoint that continues the run in `folder` (which holds the files `held`): interrupted.pth
    if it is at least as far as last.pth (an older one, left by a version that did not remove it once
    passed, would train from an earlier state), else last.pth (else whichever it holds)."""
    if INTERRUPTED in held and LAST in held:
        interrupted, last = (epoch_of(folder / name) for name in (INTERRUPTED, LAST))
        return folder / (INTERRUPTED if interrupted >= last else LAST)
    return folder / next((name for name in (INTERRUPTED, LAST) if name in held), held[-1])


def remove_if_passed(interrupted: Path, epoch: int) -> None:
    """Remove a run's interrupted.pth once the run has saved `epoch`, past it: resuming it then would
    train again from an older state, and a hint naming it would mislead."""
    if interrupted.exists() and epoch_of(interrupted) < epoch:
        interrupted.unlink()


def epoch_of(path: Path) -> float:
    """The epochs a run's checkpoint has completed (-inf if it cannot be read as one)."""
    try:
        return float(load(path).get("epoch", -math.inf))
    except (UserError, TypeError, ValueError):
        return -math.inf


# ---------------------------------------------------------------- the file


def save(checkpoint: dict, path: str | Path) -> None:
    """Write atomically (files.atomic_write), every tensor from the CPU, so that the file loads on
    machines without the training device."""
    with atomic_write(Path(path), "checkpoint") as f:
        torch.save(to_cpu(checkpoint), f)


def to_cpu(value):
    """`value` with every tensor in it (in dicts, lists and tuples, at any depth) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(item) for item in value)
    return value


def load(path: str | Path) -> dict:
    """Read a checkpoint safely (tensors and primitives only; pickled code is refused)."""
    path = Path(path)
    if path.is_dir():
        inside = f"; the run in it ends at {path / LAST}" if (path / LAST).is_file() else ""
        raise UserError(f"{path} is a folder, not a checkpoint file{inside}")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then rejects
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise UserError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    except Exception as err:  # torch raises many types for broken files; classify by the message
        unsafe = re.search(r"(?:unsupported|Unsupported global:) GLOBAL (\S+)", str(err))
        if unsafe:
            raise UserError(
                f"{path} refused: it would load {unsafe.group(1)} (a pickle that can run code); "
                "checkpoints may hold only tensors and plain data"
            ) from None
        raise UserError(f"{path} is not a valid checkpoint (truncated or corrupt file)") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


# ---------------------------------------------------------------- the network it describes


def shape_of_args(args: dict) -> Shape:
    """The shape of the network that training arguments describe (the assignment's without them)."""
    kernels = tuple(int(k) for k in str(args.get("network", ASSIGNMENT.name)).split("-"))
    channels = {"rgb": 3, "y": 1}[args.get("channels", "rgb")]
    return Shape(kernels, tuple(args.get("widths", ASSIGNMENT.widths)), channels)


def shape_of(checkpoint: dict, path: str | Path) -> Shape:
    """The shape of the network a checkpoint holds: its arguments say; a bare state_dict's weights do."""
    if "args" in checkpoint:
        try:
            return shape_of_args(checkpoint["args"])
        except (TypeError, ValueError, AttributeError, KeyError):
            raise UserError(f"{path}: its 'network', 'widths' and 'channels' arguments name no SRCNN shape") from None
    weights = checkpoint.get("model", checkpoint)
    try:
        kernels = tuple(int(weights[f"conv{i}.weight"].shape[-1]) for i in (1, 2, 3))
        widths = (int(weights["conv1.weight"].shape[0]), int(weights["conv2.weight"].shape[0]))
        return Shape(kernels, widths, int(weights["conv1.weight"].shape[1]))
    except (KeyError, TypeError, AttributeError, IndexError, ValueError):
        return ASSIGNMENT  # not SRCNN weights: network() names what is missing or wrong


def network(weights: object, path: str | Path, shape: Shape = ASSIGNMENT) -> SRCNN:
    """The network of `shape` with `weights` (a state_dict, from `path`), on the CPU, loaded strictly;
    anything else ends in one line naming what is wrong: keys missing or unexpected, the layer whose
    weights are not SRCNN's (weights_problem), weights of another shape than `shape`."""
    if not isinstance(weights, dict):
        raise UserError(f"{path}: 'model' entry is not a state_dict")
    expected = SRCNN(shape).state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise UserError(f"{path} is not an SRCNN checkpoint: " + "; ".join(
            f"{what} keys {', '.join(map(str, keys))}" for what, keys in (("missing", missing),
                                                                         ("unexpected", unexpected)) if keys))
    problem = weights_problem(weights)
    if problem:
        raise UserError(f"{path}: {problem}")
    held = shape_of({"model": weights}, path)
    if held != shape:
        key = next(k for k, t in expected.items() if t.shape != weights[k].shape)
        raise UserError(f"{path}: its weights are SRCNN {held}, but its arguments say SRCNN {shape} ({key} has shape "
                        f"{tuple(weights[key].shape)}, where the arguments' network has {tuple(expected[key].shape)})")
    model = SRCNN(shape)
    model.load_state_dict({k: weights[k].float() for k in expected})
    return model


def weights_problem(weights: dict) -> str | None:
    """What keeps SRCNN's three layers' weights (conv1..conv3, with every key present) from being an
    SRCNN's, layer by layer: tensors, kernels square and odd, 1 (Y) or 3 (RGB) channels in and the
    same out, each layer taking the channels the one before gives, biases one per filter; None if nothing."""
    for i in (1, 2, 3):
        weight, bias = weights[f"conv{i}.weight"], weights[f"conv{i}.bias"]
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (weight, bias)):
            return f"conv{i}'s weight and bias must be floating-point tensors"
        if weight.dim() != 4 or bias.shape != weight.shape[:1]:
            return (f"conv{i} has a weight of shape {tuple(weight.shape)} and a bias of shape {tuple(bias.shape)}; "
                    "a convolution's are (filters, channels in, k, k) and (filters,)")
        k = weight.shape[-2:]
        if k[0] != k[1] or k[0] % 2 == 0:
            return f"conv{i} has a {k[0]}x{k[1]} kernel; SRCNN's filters are square with an odd side"
    first, second, last = (weights[f"conv{i}.weight"] for i in (1, 2, 3))
    if first.shape[1] not in (1, 3):
        return f"conv1 takes {first.shape[1]} input channels; SRCNN takes 1 (Y) or 3 (RGB)"
    if second.shape[1] != first.shape[0]:
        return f"conv2 takes {second.shape[1]} channels, but conv1 gives {first.shape[0]}"
    if last.shape[1] != second.shape[0]:
        return f"conv3 takes {last.shape[1]} channels, but conv2 gives {second.shape[0]}"
    if last.shape[0] != first.shape[1]:
        return f"conv3 gives {last.shape[0]} channels, but conv1 takes {first.shape[1]}: the output is the input's kind"
    return None


def is_bare(checkpoint: dict) -> bool:
    """A bare state_dict: weights only, no scale, arguments or history (the ports' published files)."""
    return "model" not in checkpoint


def scale_of(checkpoint: dict, path: str | Path, given: int | None = None) -> int:
    """The checkpoint's upscaling factor; a `given` one (the user's --scale) must agree with it. A bare
    state_dict records none: it is the `given` one, else DEFAULT_SCALE."""
    if is_bare(checkpoint):
        if given is not None and given < 2:
            raise UserError("--scale must be at least 2")
        return DEFAULT_SCALE if given is None else given
    saved = checkpoint.get("scale", DEFAULT_SCALE)
    if not isinstance(saved, int) or saved < 2:
        raise UserError(f"{path}: invalid scale {saved!r}")
    if given is not None and given != saved:
        raise UserError(f"{path} is an x{saved} model; --scale {given} contradicts it")
    return saved


def model_of(checkpoint: dict, path: str | Path, device: torch.device) -> SRCNN:
    """The checkpoint's model ('model', or the checkpoint itself if it is a bare state_dict), in eval
    mode on `device`, in the memory format PyTorch's convolutions run fastest on."""
    model = network(checkpoint.get("model", checkpoint), path, shape_of(checkpoint, path))
    return model.to(device, memory_format=torch.channels_last).eval()


def load_model(path: str | Path, device: torch.device, scale: int | None = None) -> tuple[SRCNN, int, dict]:
    """(model in eval mode, scale, checkpoint) from one read of `path`; a `scale` given by the user
    must agree with the checkpoint's."""
    checkpoint = load(path)
    model = model_of(checkpoint, path, device)
    return model, scale_of(checkpoint, path, scale), checkpoint


def chosen_checkpoint(path: str | None, scale: int | None, network: str | None, otherwise: str) -> Path:
    """The checkpoint a command runs: the one named, else the trained model this project ships of
    `network` (--model; None: 915, the assignment's) for `scale` (None: x3). `otherwise` says how
    the caller takes a model of another scale."""
    if path is not None:
        if network is not None:
            raise UserError(f"--model picks a shipped model; with a checkpoint named ({path}) leave it out")
        return Path(path)
    network, scale = network or SHIPPED_NETWORKS[0], DEFAULT_SCALE if scale is None else scale
    shipped = f"x{', x'.join(str(s) for n, s in SHIPPED if n == network)}"
    if scale < 2:
        raise UserError(f"--scale must be at least 2 (models are shipped for {shipped})")
    if (network, scale) not in SHIPPED:
        raise UserError(f"no {network} model is shipped for x{scale} (only {shipped}); {otherwise}")
    return SHIPPED[network, scale]


# ---------------------------------------------------------------- a training run's state


@dataclass
class Progress:
    """Where a training run stands, besides its weights and Adam's state."""

    epoch: int = 0
    history: list = field(default_factory=list)
    best_psnr: float = -math.inf
    commands: list = field(default_factory=list)  # every train/resume command line, with its start epoch
    position: dict | None = None  # where an interrupted epoch stopped (POSITION_KEYS)


def training_checkpoint(args: dict, progress: Progress, model: nn.Module, ema: nn.Module | None,
                        optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                        generator: torch.Generator) -> dict:
    """The checkpoint of a training run (save moves every tensor to the CPU)."""
    return {
        "model": (ema if ema is not None else model).state_dict(),
        "training_weights": model.state_dict() if ema is not None else None,
        "optimizer": plain_adam_state(optimizer.state_dict()),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "args": dict(args),
        "epoch": progress.epoch,
        "history": list(progress.history),
        "best_psnr": progress.best_psnr,
        "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state()},
        "scale": args["scale"],
        "version": info.VERSION,
        "position": progress.position,
        "commands": list(progress.commands),
    }


def plain_adam_state(state: dict) -> dict:
    """An Adam's state_dict as a plain Adam's: a learning rate held as a tensor (step.CapturedStep's
    capturable Adam) saved as the number it holds, and capturable off, so that every run, on any
    device, loads it as it is."""
    groups = [{**group, "lr": float(group["lr"]), "capturable": False} for group in state["param_groups"]]
    return {**state, "param_groups": groups}


def restore_training(checkpoint: dict, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, generator: torch.Generator) -> Progress:
    """Load a checkpoint that check_resumable accepted into a run's parts; its progress."""
    model.load_state_dict(checkpoint.get("training_weights") or checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])  # moves its tensors to the weights' device
    if ema is not None:  # the checkpoint's average, or its weights if it kept none
        ema.load_state_dict(checkpoint["model"])
    if scaler.is_enabled() and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    generator.set_state(checkpoint["rng"]["generator"])
    return Progress(checkpoint["epoch"], checkpoint["history"], checkpoint["best_psnr"],
                    list(checkpoint.get("commands", [])), checkpoint.get("position"))


def check_resumable(path: str | Path, checkpoint: dict) -> None:
    """Refuse, in one line, a checkpoint that `resume` could not continue."""
    missing = [k for k in RESUME_KEYS if k not in checkpoint]
    if missing:
        raise UserError(f"{path} cannot be resumed: missing keys {', '.join(missing)}")
    shape = shape_of(checkpoint, path)
    network(checkpoint["model"], path, shape)  # checks the weights' names and shapes
    scale_of(checkpoint, path)
    position = checkpoint.get("position")
    if position is not None and not (isinstance(position, dict) and POSITION_KEYS <= set(position)):
        raise UserError(f"{path} cannot be resumed: its 'position' is not a mid-epoch position")
    if checkpoint.get("training_weights") is not None:
        try:
            SRCNN(shape).load_state_dict(checkpoint["training_weights"])
        except (RuntimeError, TypeError, AttributeError, ValueError):
            raise UserError(f"{path} cannot be resumed: its 'training_weights' are not SRCNN weights") from None


def resume_options(path: str | Path, checkpoint: dict, given: dict, defaults: dict) -> dict:
    """The arguments `resume` trains with: the checkpoint's, overridden by the flags `given` on the
    command line; `defaults` (the train command's) fill options newer than the checkpoint. The
    device is chosen anew by every run; the scale and the network's shape are the checkpoint's; a
    --num-epoch already reached ends in one line, before any work."""
    scale_of(checkpoint, path, given.get("scale"))
    shape = shape_of(checkpoint, path)
    if shape_of_args({**checkpoint["args"], **given}) != shape:
        raise UserError(f"{path} holds SRCNN {shape}; --network, --widths and --channels cannot change it")
    saved = {k: v for k, v in checkpoint["args"].items() if not (k == "bf16_probe" and "amp" in given)}
    options = {**defaults, **saved, "cuda": False, **given}  # an --amp given anew is probed anew
    if checkpoint["epoch"] >= options["num_epoch"]:
        raise UserError(f"nothing to do: {path} has trained {checkpoint['epoch']} epochs, and --num-epoch "
                        f"{options['num_epoch']} asks for no more; give a larger --num-epoch to train on")
    return options


def training_sets(args: dict) -> list[str]:
    """The training set folders (--train-set): a list, or the one name that checkpoints from before
    several folders were possible record."""
    sets = args["train_set"]
    return [sets] if isinstance(sets, str) else list(sets)


def launch_command(argv: list[str]) -> str:
    """The command line that started this run, for the checkpoint's record: under torchrun the
    launcher's own (read from /proc on Linux), else `python train.py ...`."""
    command = "python train.py " + shlex.join(argv)
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return command
    try:
        parts = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")[:-1]
    except (OSError, UnicodeDecodeError):
        parts = []
    if not parts:
        return (f"torchrun --nnodes={os.environ.get('GROUP_WORLD_SIZE', '?')} "
                f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')} train.py {shlex.join(argv)}")
    if Path(parts[0]).name.startswith("python"):
        parts = ["torchrun", *parts[2:]] if len(parts) > 1 and parts[1].endswith("torchrun") else ["python", *parts[1:]]
    return shlex.join(parts)
