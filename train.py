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
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import info
from data import DEGRADATIONS, TrainingPatches, default_data_root, load_pairs
from inference import evaluate, load_model, shipped_checkpoint
from processes import Processes, StopRequest, launch_command
from report import EVALUATION_SETS, evaluate_checkpoint, inspect_checkpoints
from training_state import TrainingState, amp_settings, check_resumable, optimizer_steps, update_ema
from utils import (
    HelpFormatter,
    UserError,
    load_checkpoint,
    removed_if_left_empty,
    run_cli,
    save_checkpoint,
    writable_folder,
)

CPU_CHUNK_PIXELS = 32 * 33 * 33  # patch pixels per forward/backward pass on a CPU (see cpu_chunk)
CHECK_EVERY = 10  # batches between checks of the loss and of stop signals: the only host synchronisations


# ---------------------------------------------------------------- one step, and a batch for it


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
               border: int = 0, chunk: int | None = None,
               autocast: contextlib.AbstractContextManager | None = None,
               scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """One MSE/Adam update on a batch; its loss (`border` pixels in from the patch edges) as a tensor
    on the device, so that nothing waits for the device. `chunk` patches pass at a time with the
    gradients summed: the same update, but on a CPU the activations stay in cache (see cpu_chunk);
    None = all at once (the GPU's way). `autocast`: the forward pass's mixed-precision
    context; `scaler`: the fp16 loss scaler."""
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


def cpu_chunk(patch_size: int) -> int:
    """Patches per forward/backward pass on a CPU: passes of about 35k pixels keep the activations in
    cache; passes of 74k ran the step 1.25-1.4x slower at 48x48 and 96x96 patches (docs/speed.md)."""
    return max(1, CPU_CHUNK_PIXELS // patch_size**2)


def make_batch(inputs: torch.Tensor, targets: torch.Tensor, index: torch.Tensor,
               transform: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 patches -> float [0, 1] on their device, under one of the 8 flips/rotations (0 = none)."""
    pair = []
    for source in (inputs, targets):
        x = source[index].float().div_(255)
        if transform & 4:
            x = x.flip(-1)
        if transform & 3:  # rot90 copies even by 0 turns
            x = x.rot90(transform & 3, (-2, -1))
        pair.append(x.contiguous(memory_format=torch.channels_last))
    return pair[0], pair[1]


def learning_rate(args: dict, progress: float) -> float:
    """The learning rate at `progress` (epochs done, fractional) of `num_epoch`. A linear warm-up over
    the first `warmup` epochs lets Adam's moments settle (without it, lr 1e-3 spikes around epoch 3)."""
    lr = args["lr"]
    if args["lr_decay"] == "cosine":
        t = min(progress / args["num_epoch"], 1.0)
        lr = args["min_lr"] + (args["lr"] - args["min_lr"]) * 0.5 * (1 + math.cos(math.pi * t))
    if progress < args["warmup"]:  # never exactly zero at the first step, never above --lr at the last
        lr *= min(1.0, (progress + 1 / 64) / args["warmup"])
    return lr


# ---------------------------------------------------------------- the loop


def fit(args: dict, checkpoint: dict | None = None, command: str | None = None) -> int:
    """Train until args['num_epoch'] epochs are done, from scratch or from `checkpoint`. Under
    torchrun each process trains on its share of every batch (DDP); rank 0 evaluates and saves."""
    out_dir = Path(args["checkpoint_dir"])
    with removed_if_left_empty(out_dir), Processes.start(args["cuda"], args["batch_size"]) as processes:
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
                              args["zooms"], processes.device, args["degradation"])
    if not processes.main:
        return patches, []
    writable_folder(Path(args["checkpoint_dir"]))
    evaluated_as = "matlab" if args["degradation"] == "matlab" else "pil"  # mixed training: evaluated on Pillow's
    return patches, load_pairs(root / args["eval_set"], args["scale"], degradation=evaluated_as)


def train_epoch(state: TrainingState, ddp_model: nn.Module, patches: TrainingPatches, processes: Processes,
                stop: StopRequest,
                autocast: contextlib.AbstractContextManager | None) -> tuple[dict | None, int | None]:
    """One epoch of steps (from state.position, if an interrupted one is resumed). Returns the
    training part of its history record (None if stopped mid-epoch: state.position then says where,
    and the generator is back at the epoch's start so that resume replays its draws) and the stop
    signal every process agreed on at the last check (None: go on)."""
    args = state.args
    epoch_start = state.generator.get_state()
    position = state.position or {"batch": 0, "loss_sum": 0.0, "seconds": 0.0}
    patches.new_epoch(state.generator, move_grid=args["fresh_crops"])
    batches = processes.share(len(patches), args["batch_size"], args["seed"], state.epoch)
    transforms = torch.randint(8 if args["augment"] else 1, (len(batches),), generator=state.generator)
    chunk = cpu_chunk(args["patch_size"]) if processes.device.type == "cpu" else None
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
                update_ema(state.ema, state.model, args["ema_decay"], optimizer_steps(state.optimizer))
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


def check(state: TrainingState, processes: Processes, loss_sum: torch.Tensor, stop: StopRequest,
          done: int) -> tuple[float, int | None]:
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
    record = {"epoch": state.epoch, "loss": record["loss"], "psnr": scores["psnr"], "ssim": scores["ssim"], **record}
    state.history.append(record)
    print(f"epoch {state.epoch:4d}  loss {record['loss']:.6f}  {args['eval_set']} PSNR {record['psnr']:.3f} dB  SSIM "
          f"{record['ssim']:.4f}  {record['seconds']:.1f} s  ({record['patches_per_s']:.0f} patches/s)", flush=True)
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


# ---------------------------------------------------------------- command line


def add_training_flags(parser: argparse.ArgumentParser, resume: bool) -> None:
    """The training flags; for `resume` they default to 'not given' so the saved values stand."""

    def flag(*names, **kwargs):
        if resume:  # the device is chosen anew by every run
            kwargs["default"] = argparse.SUPPRESS
            kwargs["help"] += " (default: off)" if names[0] == "--cuda" else " (default: as saved)"
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
    flag("--warmup", type=float, default=1.0, help="epochs of linear learning-rate warm-up at the start")
    flag("--augment", action="store_true", help="random flips/rotations of each batch")
    flag("--fresh-crops", action="store_true", help="move the patch grid to a random offset every epoch")
    flag("--loss-border", type=int, default=0,
         help="leave this many pixels at each patch edge out of the loss (6: only pixels zero padding cannot reach)")
    flag("--amp", nargs="?", const="bf16", choices=["off", "bf16", "fp16"], default="off",
         help="CUDA automatic mixed precision: --amp (bf16) or --amp fp16")
    flag("--init", default="default", metavar="{default,identity,CHECKPOINT}",
         help="starting weights: PyTorch's default, the identity mapping, or a checkpoint's "
              "(e.g. checkpoint.pth, the x3 model, to train x2 or x4 from)")
    flag("--ema-decay", type=float, default=0.0, metavar="D",
         help="evaluate and save a moving average of the weights, updated every step with this decay (0: off)")
    flag("--degradation", choices=[*DEGRADATIONS, "mixed"], default="pil",
         help="bicubic of the inputs: Pillow's, MATLAB's imresize, or per image one of the two each epoch")
    flag("--zooms", type=float, nargs="+", default=[1.0], metavar="Z",
         help="train on every training image shrunk by each factor, e.g. 1 0.9 0.8 0.7 0.6 (1: as it is)")


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
    parser = argparse.ArgumentParser(description="Train and examine SRCNN models.", formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=info.version_string())
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, formatter_class=HelpFormatter)

    train_parser = command("train", "train a new model")
    add_training_flags(train_parser, resume=False)
    resume = command("resume", "continue training from a checkpoint; given flags override saved ones")
    resume.add_argument("checkpoint", help="a checkpoint written by train or resume")
    add_training_flags(resume, resume=True)
    insp = command("inspect", "show checkpoints' arguments, commands and history; draw their curves or filters")
    insp.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="the checkpoint(s) to describe")
    insp.add_argument("--history", action="store_true", help="list every epoch, not only the last few")
    insp.add_argument("--json", action="store_true", help="print JSON instead of text (everything)")
    insp.add_argument("--plot", metavar="PATH", help="draw the training curves into an image; of several checkpoints, "
                      "their PSNR against training minutes (default: no picture)")
    insp.add_argument("--filters", metavar="PATH", help="draw the 64 first-layer filters (default: no picture)")
    insp.add_argument("--reach", type=float, nargs="+", metavar="DB", help="also print the minutes of training "
                      "each run took to reach these evaluation PSNRs, e.g. 30.40 32.00 32.39 (default: none)")
    ev = command("evaluate", "Y-PSNR / SSIM of a checkpoint and of bicubic on whole data sets")
    ev.add_argument("checkpoint", nargs="?", help="the checkpoint to evaluate (default: the model shipped for "
                    "--scale: checkpoint.pth for x3, models/srcnn_x2.pth, models/srcnn_x4.pth)")
    ev.add_argument("--sets", nargs="+", help="data set folders under the data root (default: those of "
                    f"{', '.join(EVALUATION_SETS)} found there)")
    ev.add_argument("--degradation", choices=DEGRADATIONS, default="pil", help="bicubic: Pillow's or MATLAB's")
    ev.add_argument("--data-root", default=default_data_root(), help="folder with one folder per set")
    ev.add_argument("--cuda", action="store_true", help="run on the GPU")
    ev.add_argument("--self-ensemble", action="store_true", help="average the 8 flips/rotations")
    ev.add_argument("--scale", type=int, help="upscaling factor: without CHECKPOINT it picks the shipped model, "
                    "with one it must agree (default: the checkpoint's, or 3)")
    ev.add_argument("--report", metavar="DIR", help="also write an HTML page comparing the pictures, DIR/index.html "
                    "(default: none)")
    return parser, train_parser


def main(argv: list[str] | None = None) -> int:
    parser, train_parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    command = launch_command(argv)

    if args.command == "inspect":
        return inspect_checkpoints(args.checkpoints, args.json, args.plot, args.filters, args.history, args.reach)
    if args.command == "evaluate":
        path = args.checkpoint or str(shipped_checkpoint(
            args.scale, "name a checkpoint trained at that scale: python train.py evaluate CHECKPOINT"))
        return evaluate_checkpoint(path, args.sets, args.data_root, args.cuda, args.self_ensemble, args.scale,
                                   args.degradation, args.report)
    if args.command == "train":
        options = {k: v for k, v in vars(args).items() if k != "command"}
        check_training_args(options)
        if options["init"] not in ("default", "identity"):  # a bad --init CHECKPOINT ends here, before any work
            load_model(options["init"], torch.device("cpu"))
        return fit(options, command=command)
    checkpoint = load_checkpoint(args.checkpoint)
    check_resumable(args.checkpoint, checkpoint)
    given = {k: v for k, v in vars(args).items() if k not in ("command", "checkpoint")}
    if given.get("scale", checkpoint["scale"]) != checkpoint["scale"]:
        raise UserError(f"{args.checkpoint} was trained at x{checkpoint['scale']}; "
                        f"--scale {given['scale']} contradicts it")
    defaults = vars(train_parser.parse_args([]))  # for options newer than the checkpoint
    options = {**defaults, **checkpoint["args"], "cuda": False, **given}  # the device is chosen anew by each run
    check_training_args(options)
    return fit(options, checkpoint, command)


if __name__ == "__main__":
    run_cli(main)
