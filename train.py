"""Train SRCNN and resume training; inspect and evaluate checkpoints (reports in report.py).

    python train.py train --lr=0.001 --batch-size=128 --num-epoch=20 --save-freq=2
    python train.py resume checkpoints/last.pth --num-epoch=200
    python train.py inspect checkpoints/best.pth
    python train.py evaluate checkpoint.pth --sets Set5 Set14

Training reads in phases: restore (TrainingState.from_checkpoint), one epoch of steps
(train_epoch), the end of the epoch (end_epoch: evaluate, record, save). Under torchrun the
processes it starts agree, every CHECK_EVERY batches, on whether to go on (processes.py).
"""

import argparse
import contextlib
import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import info
from data import TrainingPatches, default_data_root, load_pairs
from inference import evaluate, load_model
from model import SRCNN, init_identity_
from processes import Processes, StopRequest, launch_command
from report import evaluate_checkpoint, inspect_checkpoint
from utils import HelpFormatter, UserError, load_checkpoint, run_cli, save_checkpoint, seed_everything

CPU_CHUNK = 32  # patches per forward/backward pass on a CPU (see train_step)
CHECK_EVERY = 10  # batches between checks of the loss and of stop signals: the only host synchronisations
POSITION_KEYS = {"batch", "batches", "loss_sum", "seconds"}
CHECKPOINT_KEYS = ("model", "optimizer", "args", "epoch", "history", "best_psnr", "rng", "scale", "version")


# ---------------------------------------------------------------- what a checkpoint carries


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


# ---------------------------------------------------------------- one step, and a batch for it


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    border: int = 0,
    chunk: int | None = CPU_CHUNK,
    autocast: contextlib.AbstractContextManager | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One MSE/Adam update on a batch; returns its loss (a tensor on the batch's device: reading it
    would wait for the device), taken `border` pixels in from the patch edges.

    The batch passes through the network `chunk` patches at a time with the gradients summed: the
    same update as the whole batch at once, but on a CPU the activations stay in cache (measured
    1.5x faster at batch 128). None = the whole batch at once (the GPU's way). `autocast` is the
    mixed-precision context for the forward pass; `scaler` scales an fp16 loss.
    """
    optimizer.zero_grad(set_to_none=True)
    size = chunk or len(inputs)
    pairs = list(zip(inputs.split(size), targets.split(size), strict=True))
    total = torch.zeros((), device=inputs.device)
    for i, (x, y) in enumerate(pairs):
        last = i == len(pairs) - 1  # DDP averages gradients across processes once, after the last chunk
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast or contextlib.nullcontext():
                out = model(x)
            out = out.float()
            if border:
                out, y = out[..., border:-border, border:-border], y[..., border:-border, border:-border]
            loss = F.mse_loss(out, y) * (len(x) / len(inputs))
            (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach()
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return total


def make_batch(
    inputs: torch.Tensor, targets: torch.Tensor, index: torch.Tensor, transform: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 patches -> float [0, 1] on their device, under one of the 8 flips/rotations (0 = none)."""
    pair = []
    for source in (inputs, targets):
        x = source[index].float().div_(255)
        if transform & 4:
            x = x.flip(-1)
        pair.append(x.rot90(transform & 3, (-2, -1)).contiguous(memory_format=torch.channels_last))
    return pair[0], pair[1]


def learning_rate(args: dict, progress: float) -> float:
    """The learning rate at `progress` (epochs done, fractional) of `num_epoch`.

    A linear warm-up over the first `warmup` epochs lets Adam's moment estimates settle before
    full-size steps (without it, lr 1e-3 spikes the loss around epoch 3).
    """
    lr = args["lr"]
    if args["lr_decay"] == "cosine":
        t = min(progress / args["num_epoch"], 1.0)
        lr = args["min_lr"] + (args["lr"] - args["min_lr"]) * 0.5 * (1 + math.cos(math.pi * t))
    if progress < args["warmup"]:
        lr *= (progress + 1 / 64) / args["warmup"]  # never exactly zero at the first step
    return lr


def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, weight by weight: an average over the last
    ~1 / (1 - decay) steps, steadier than the last step's weights."""
    with torch.no_grad():
        for average, weight in zip(ema.parameters(), model.parameters(), strict=True):
            average.lerp_(weight, 1 - decay)


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


# ---------------------------------------------------------------- the loop


def fit(args: dict, checkpoint: dict | None = None, command: str | None = None) -> int:
    """Train until args['num_epoch'] epochs are done, from scratch or from `checkpoint`. Under
    torchrun each process trains on its share of every batch (DDP); rank 0 evaluates and saves."""
    with Processes.start(args["cuda"], args["batch_size"]) as processes:
        out_dir = Path(args["checkpoint_dir"])
        patches, eval_pairs = processes.agree(load_data, args, processes)
        autocast, scaler = amp_settings(args, processes.device)
        state = TrainingState.from_checkpoint(args, processes.device, checkpoint, command, scaler)
        ddp_model = processes.wrap(state.model)
        processes.say(f"training on {len(patches)} patches of {args['patch_size']}x{args['patch_size']} from "
                      f"{Path(args['data_root']) / args['train_set']}, {processes}, "
                      f"epochs {state.epoch + 1}..{args['num_epoch']}")
        with StopRequest() as stop:
            while state.epoch < args["num_epoch"]:
                record, signum = train_epoch(state, ddp_model, patches, processes, stop, autocast)
                if record is not None:
                    processes.agree(end_epoch, state, record, eval_pairs, out_dir, processes.main)
                if signum:  # mid-epoch, or at the end of one: every process agreed to stop here
                    return processes.agree(save_interrupted, state, out_dir, signum, processes.main)
        processes.say(f"done: best {args['eval_set']} PSNR {state.best_psnr:.3f} dB; checkpoints in {out_dir}")
        return 0


def load_data(args: dict, processes: Processes) -> tuple[TrainingPatches, list]:
    """The training patches (on the training device) and, for rank 0, the evaluation pairs; rank 0
    also makes sure the checkpoint folder can be written before any training."""
    root = Path(args["data_root"])
    patches = TrainingPatches(root / args["train_set"], args["scale"], args["patch_size"], args["stride"],
                              args["zooms"], processes.device)
    if not processes.main:
        return patches, []
    out_dir = Path(args["checkpoint_dir"])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create checkpoint folder {out_dir}: {err.strerror or err}") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"checkpoint folder {out_dir} is not writable")
    return patches, load_pairs(root / args["eval_set"], args["scale"])


def train_epoch(
    state: TrainingState,
    ddp_model: nn.Module,
    patches: TrainingPatches,
    processes: Processes,
    stop: StopRequest,
    autocast: contextlib.AbstractContextManager | None,
) -> tuple[dict | None, int | None]:
    """One epoch of steps (from state.position, if an interrupted one is resumed). Returns the
    training part of its history record (None if stopped mid-epoch: state.position then says where,
    and the generator is back at the epoch's start so that resume replays its draws) and the stop
    signal every process agreed on at the last check (None: go on)."""
    args = state.args
    epoch_start = state.generator.get_state()
    position = state.position or {"batch": 0, "loss_sum": 0.0, "seconds": 0.0}
    if args["fresh_crops"]:
        patches.reshuffle_grid(state.generator)
    batches = processes.share(len(patches), args["batch_size"], args["seed"], state.epoch)
    transforms = torch.randint(8 if args["augment"] else 1, (len(batches),), generator=state.generator)
    chunk = CPU_CHUNK if processes.device.type == "cpu" else None
    loss_sum = torch.tensor(position["loss_sum"] if processes.main else 0.0, dtype=torch.float64,
                            device=processes.device)  # summed on the device: no wait for it per step
    start = time.perf_counter() - position["seconds"]
    ddp_model.train()
    with tqdm(total=len(batches), initial=position["batch"], desc=f"epoch {state.epoch + 1}", leave=False,
              file=sys.stderr, disable=not processes.main) as bar:
        for i in range(position["batch"], len(batches)):
            for group in state.optimizer.param_groups:
                group["lr"] = learning_rate(args, state.epoch + i / len(batches))
            inputs, targets = make_batch(patches.inputs, patches.targets, batches[i], int(transforms[i]))
            loss = train_step(ddp_model, state.optimizer, inputs, targets, args["loss_border"], chunk, autocast,
                              state.scaler)
            if state.ema is not None:
                update_ema(state.ema, state.model, args["ema_decay"])
            loss_sum += loss * len(batches[i])
            bar.update()
            done, seconds = i + 1, time.perf_counter() - start
            if done % CHECK_EVERY == 0 or done == len(batches):
                total, signum = check(state, processes, loss_sum, stop, done)
                bar.set_postfix(loss=f"{total / (done * args['batch_size']):.5f}",
                                patches_s=f"{done * args['batch_size'] / seconds:.0f}")
                if signum and done < len(batches):
                    state.generator.set_state(epoch_start)
                    state.position = {"batch": done, "batches": len(batches), "loss_sum": total, "seconds": seconds}
                    return None, signum
    state.position = None
    record = {"loss": total / len(patches), "seconds": seconds, "patches_per_s": len(patches) / seconds,
              "lr": state.optimizer.param_groups[0]["lr"]}
    return record, signum


def check(
    state: TrainingState, processes: Processes, loss_sum: torch.Tensor, stop: StopRequest, done: int
) -> tuple[float, int | None]:
    """(the epoch's loss sum so far over all processes, the stop signal they agreed on); a loss that
    is not finite in any process stops every process here, before any checkpoint is written."""
    total, signum = processes.check(loss_sum, stop.signum)
    if not math.isfinite(total):
        raise UserError(f"loss became {total} in epoch {state.epoch + 1} by batch {done}; training stopped, "
                        f"checkpoints in {state.args['checkpoint_dir']} are untouched (try a lower --lr)")
    return total, signum


def end_epoch(state: TrainingState, record: dict, eval_pairs: list, out_dir: Path, main: bool) -> None:
    """Count the epoch; on rank 0 evaluate, print and record it, and write the checkpoints."""
    state.epoch += 1
    if not main:
        return
    args = state.args
    state.eval_model.eval()
    scores = evaluate(state.eval_model, eval_pairs, args["scale"])
    record = {"epoch": state.epoch, "loss": record["loss"], "psnr": scores["psnr"], "ssim": scores["ssim"],
              "seconds": record["seconds"], "patches_per_s": record["patches_per_s"], "lr": record["lr"]}
    state.history.append(record)
    print(f"epoch {state.epoch:4d}  loss {record['loss']:.6f}  {args['eval_set']} PSNR {record['psnr']:.3f} dB  "
          f"SSIM {record['ssim']:.4f}  {record['seconds']:.1f} s  ({record['patches_per_s']:.0f} patches/s)",
          flush=True)
    improved = record["psnr"] > state.best_psnr
    state.best_psnr = max(state.best_psnr, record["psnr"])
    checkpoint = state.to_checkpoint()
    save_checkpoint(checkpoint, out_dir / "last.pth")
    if improved:
        save_checkpoint(checkpoint, out_dir / "best.pth")
    if state.epoch % args["save_freq"] == 0 or state.epoch == args["num_epoch"]:
        save_checkpoint(checkpoint, out_dir / f"checkpoint.{state.epoch}.pth")


def save_interrupted(state: TrainingState, out_dir: Path, signum: int, main: bool) -> int:
    if main:
        path = out_dir / "interrupted.pth"
        save_checkpoint(state.to_checkpoint(), path)
        print(f"interrupted: saved {path}; continue with: python train.py resume {path}", file=sys.stderr)
    return 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def validate_training_checkpoint(path: str, state: dict) -> None:
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise UserError(f"{path} cannot be resumed: missing keys {', '.join(missing)}")
    load_model(path, torch.device("cpu"))  # checks the weights' names and shapes
    position = state.get("position")
    if position is not None and not (isinstance(position, dict) and POSITION_KEYS <= set(position)):
        raise UserError(f"{path} cannot be resumed: its 'position' is not a mid-epoch position")
    if state.get("training_weights") is not None:
        try:
            SRCNN().load_state_dict(state["training_weights"])
        except (RuntimeError, TypeError, AttributeError, ValueError):
            raise UserError(f"{path} cannot be resumed: its 'training_weights' are not SRCNN weights") from None


# ---------------------------------------------------------------- command line


def add_training_flags(parser: argparse.ArgumentParser, resume: bool) -> None:
    """The training flags; for `resume` they default to 'not given' so the saved values stand."""

    def flag(*names, **kwargs):
        if resume:
            kwargs["default"] = argparse.SUPPRESS
            device = names[0] == "--cuda"
            kwargs["help"] += " (default: off: each run chooses its device)" if device else " (default: as saved)"
        parser.add_argument(*names, **kwargs)

    flag("--cuda", action="store_true", help="train on the GPU")
    flag("--lr", type=float, default=1e-4, help="Adam learning rate")
    flag("--batch-size", type=int, default=128, help="patches per step")
    flag("--num-epoch", type=int, default=100, help="train until this many epochs in total")
    flag("--save-freq", type=int, default=10, help="write checkpoint.<epoch>.pth every N epochs")
    flag("--scale", type=int, default=3, help="upscaling factor")
    flag("--seed", type=int, default=0, help="random seed")
    flag("--data-root", default=default_data_root(), help="folder with one folder per set")
    flag("--train-set", default="T91", help="training set folder")
    flag("--eval-set", default="Set5", help="evaluation set folder")
    flag("--patch-size", type=int, default=33, help="training patch size")
    flag("--stride", type=int, default=14, help="patch grid stride")
    flag("--checkpoint-dir", default="checkpoints", help="where checkpoints go")
    flag("--lr-decay", choices=["none", "cosine"], default="none", help="learning-rate schedule")
    flag("--min-lr", type=float, default=1e-6, help="final learning rate of the cosine schedule")
    flag("--warmup", type=float, default=1.0,
         help="epochs of linear learning-rate warm-up at the start")
    flag("--augment", action="store_true", help="random flips/rotations of each batch")
    flag("--fresh-crops", action="store_true", help="move the patch grid to a random offset every epoch")
    flag("--loss-border", type=int, default=0,
         help="ignore this many pixels at each patch edge in the loss; 6 = only where zero padding has no "
              "effect, as the paper's unpadded training")
    flag("--amp", nargs="?", const="bf16", choices=["off", "bf16", "fp16"], default="off",
         help="CUDA automatic mixed precision: --amp (bf16) or --amp fp16")
    flag("--init", choices=["default", "identity"], default="default",
         help="weight initialisation: PyTorch's default, or the identity mapping")
    flag("--ema-decay", type=float, default=0.0, metavar="D",
         help="evaluate and save an exponential moving average of the weights, updated after every step "
              "with this decay, e.g. 0.9998; 0 = off")
    flag("--zooms", type=float, nargs="+", default=[1.0], metavar="Z",
         help="train on every training image shrunk by each of these factors, e.g. 1 0.9 0.8 0.7 0.6; "
              "1 = as it is")


def check_training_args(args: dict) -> None:
    """Every training flag within its range, so a bad value ends in one line, not deep in training."""
    for key in ("batch_size", "num_epoch", "save_freq", "patch_size", "stride"):
        if args[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1")
    if args["scale"] < 2:
        raise UserError("--scale must be at least 2")
    if not args["lr"] > 0:
        raise UserError("--lr must be positive")
    if not 0 <= args["loss_border"] < args["patch_size"] // 2:
        raise UserError("--loss-border must be at least 0 and less than half the patch size")
    if not 0 <= args["ema_decay"] < 1:
        raise UserError("--ema-decay must lie in [0, 1)")
    if not all(0 < z <= 1 for z in args["zooms"]):
        raise UserError("--zooms must lie in (0, 1]: the training images are only ever shrunk")


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(the whole CLI, the `train` subcommand's parser, whose defaults fill options newer than a checkpoint)."""
    formatter = HelpFormatter
    parser = argparse.ArgumentParser(description="Train and examine SRCNN models.", formatter_class=formatter)
    parser.add_argument("--version", action="version", version=info.version_string())
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = sub.add_parser("train", help="train a new model", formatter_class=formatter)
    add_training_flags(train_parser, resume=False)
    resume = sub.add_parser("resume", help="continue training from a checkpoint; given flags override saved ones",
                            formatter_class=formatter)
    resume.add_argument("checkpoint", help="a checkpoint written by train or resume")
    add_training_flags(resume, resume=True)
    insp = sub.add_parser("inspect", help="show a checkpoint's arguments and history", formatter_class=formatter)
    insp.add_argument("checkpoint", help="the checkpoint to describe")
    insp.add_argument("--json", action="store_true", help="print JSON instead of text")
    insp.add_argument("--plot", metavar="PATH",
                      help="draw loss and PSNR per epoch into an image, e.g. curve.png (default: no picture)")
    ev = sub.add_parser("evaluate", help="Y-PSNR / SSIM of a checkpoint and of bicubic on whole data sets",
                        formatter_class=formatter)
    ev.add_argument("checkpoint", help="the checkpoint to evaluate")
    ev.add_argument("--sets", nargs="+", default=["Set5", "Set14"], help="data set folders under the data root")
    ev.add_argument("--data-root", default=default_data_root(), help="folder with one folder per set")
    ev.add_argument("--cuda", action="store_true", help="run on the GPU")
    ev.add_argument("--self-ensemble", action="store_true", help="average the 8 flips/rotations")
    ev.add_argument("--scale", type=int, help="check the checkpoint upscales by this factor (default: no check)")
    return parser, train_parser


def main(argv: list[str] | None = None) -> int:
    parser, train_parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    command = launch_command(argv)

    if args.command == "inspect":
        return inspect_checkpoint(args.checkpoint, args.json, args.plot)
    if args.command == "evaluate":
        return evaluate_checkpoint(
            args.checkpoint, args.sets, args.data_root, args.cuda, args.self_ensemble, args.scale
        )
    if args.command == "train":
        options = {k: v for k, v in vars(args).items() if k != "command"}
        check_training_args(options)
        return fit(options, command=command)
    state = load_checkpoint(args.checkpoint)
    validate_training_checkpoint(args.checkpoint, state)
    given = {k: v for k, v in vars(args).items() if k not in ("command", "checkpoint")}
    if given.get("scale", state["scale"]) != state["scale"]:
        raise UserError(f"{args.checkpoint} was trained at x{state['scale']}; --scale {given['scale']} contradicts it")
    defaults = vars(train_parser.parse_args([]))  # for options newer than the checkpoint
    options = {**defaults, **state["args"], "cuda": False, **given}  # the device is chosen anew by each run
    check_training_args(options)
    return fit(options, state, command)


if __name__ == "__main__":
    run_cli(main)
