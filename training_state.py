"""What a checkpoint of a training run holds (TrainingState), the parts of that state a step
updates (the moving average, the fp16 loss scaler), and the check that a checkpoint can be resumed."""

import contextlib
import copy
import math
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

import info
from inference import load_model
from model import SRCNN, init_identity_
from utils import UserError, seed_everything

POSITION_KEYS = {"batch", "batches", "loss_sum", "seconds"}
CHECKPOINT_KEYS = ("model", "optimizer", "args", "epoch", "history", "best_psnr", "rng", "scale", "version")


@dataclass
class TrainingState:
    """The weights being trained and where training stands: everything a checkpoint holds."""

    args: dict
    model: SRCNN  # the weights the optimizer trains (DDP, if any, wraps this one)
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # every random draw of crops, batch flips and rotations
    ema: SRCNN | None = None  # with --ema-decay: the moving average, which is evaluated and used
    scaler: torch.amp.GradScaler | None = None  # with --amp fp16: the loss scale
    epoch: int = 0
    history: list = field(default_factory=list)
    best_psnr: float = -math.inf
    commands: list = field(default_factory=list)  # every train/resume command line, with its start epoch
    position: dict | None = None  # where an interrupted epoch stopped (POSITION_KEYS)

    @property
    def eval_model(self) -> SRCNN:
        return self.ema if self.ema is not None else self.model

    @classmethod
    def from_checkpoint(cls, args: dict, device: torch.device, checkpoint: dict | None = None,
                        command: str | None = None, scaler: torch.amp.GradScaler | None = None) -> "TrainingState":
        """A fresh state seeded from args['seed'], continued from `checkpoint` when given."""
        seed_everything(args["seed"])
        model = SRCNN()
        if args["init"] == "identity":
            init_identity_(model)
        elif args["init"] != "default" and checkpoint is None:  # a resumed run has its own weights
            model.load_state_dict(load_model(args["init"], torch.device("cpu"))[0].state_dict())
        model = model.to(device, memory_format=torch.channels_last)
        state = cls(args, model, torch.optim.Adam(model.parameters(), lr=args["lr"]),
                    torch.Generator().manual_seed(args["seed"]), copy.deepcopy(model) if args["ema_decay"] else None,
                    scaler)
        if checkpoint is not None:
            state.restore(checkpoint)
        if command:
            state.commands.append({"epoch": state.epoch, "command": command})
        return state

    def restore(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint.get("training_weights") or checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])  # moves its tensors to the weights' device
        if self.ema is not None:  # the checkpoint's average, or its weights if it kept none
            self.ema.load_state_dict(checkpoint["model"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.epoch, self.history, self.best_psnr = checkpoint["epoch"], checkpoint["history"], checkpoint["best_psnr"]
        self.commands, self.position = list(checkpoint.get("commands", [])), checkpoint.get("position")
        torch.set_rng_state(checkpoint["rng"]["torch"])
        self.generator.set_state(checkpoint["rng"]["generator"])

    def to_checkpoint(self) -> dict:
        """The plain dict every checkpoint is (save_checkpoint moves every tensor to the CPU)."""
        return {
            "model": self.eval_model.state_dict(),
            "training_weights": self.model.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "args": dict(self.args),
            "epoch": self.epoch,
            "history": list(self.history),
            "best_psnr": self.best_psnr,
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state()},
            "scale": self.args["scale"],
            "version": info.VERSION,
            "position": self.position,
            "commands": list(self.commands),
        }


def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model, weight by weight: an average over the last ~1 / (1 - decay)
    steps, steadier than the last step's weights. Before `step` (the optimizer steps taken) nears
    1 / (1 - decay), d = (1 + step) / (10 + step) instead, as in TensorFlow's ExponentialMovingAverage,
    so that the average forgets the initial weights within the first steps."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for average, weight in zip(ema.parameters(), model.parameters(), strict=True):
            average.lerp_(weight, 1 - d)


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """The steps Adam has taken, kept in its state and so in every checkpoint."""
    first = optimizer.param_groups[0]["params"][0]
    return int(optimizer.state[first]["step"]) if first in optimizer.state else 0


def amp_settings(args: dict, device: torch.device) -> tuple[contextlib.AbstractContextManager | None,
                                                             torch.amp.GradScaler | None]:
    """(autocast context, made once and entered at every step; fp16 loss scaler) for --amp."""
    if args.get("amp", "off") == "off":
        return None, None
    if device.type != "cuda":
        print("note: --amp applies to CUDA only; training on the CPU in float32", file=sys.stderr)
        return None, None
    dtype = torch.bfloat16 if args["amp"] == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype), torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def check_resumable(path: str, checkpoint: dict) -> None:
    """Refuse, in one line, a checkpoint that `resume` could not continue."""
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise UserError(f"{path} cannot be resumed: missing keys {', '.join(missing)}")
    load_model(path, torch.device("cpu"))  # checks the weights' names and shapes
    position = checkpoint.get("position")
    if position is not None and not (isinstance(position, dict) and POSITION_KEYS <= set(position)):
        raise UserError(f"{path} cannot be resumed: its 'position' is not a mid-epoch position")
    if checkpoint.get("training_weights") is not None:
        try:
            SRCNN().load_state_dict(checkpoint["training_weights"])
        except (RuntimeError, TypeError, AttributeError, ValueError):
            raise UserError(f"{path} cannot be resumed: its 'training_weights' are not SRCNN weights") from None
