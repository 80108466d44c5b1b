"""Train SRCNN, resume training, inspect and evaluate checkpoints.

    python train.py train --lr=0.001 --batch-size=128 --num-epoch=20 --save-freq=2
    python train.py resume checkpoints/last.pth --num-epoch=200
    python train.py inspect checkpoints/best.pth
    python train.py evaluate checkpoint.pth --sets Set5 Set14
"""

import argparse
import contextlib
import copy
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

import info
from data import TrainingPatches, default_data_root, load_pairs
from model import SRCNN, init_identity_
from super_resolve import evaluate, load_model, save_image
from utils import HelpFormatter, UserError, choose_device, load_checkpoint, run_cli, save_checkpoint, seed_everything

CPU_CHUNK = 32  # patches per forward/backward pass on a CPU (see train_step)
POSITION_KEYS = {"batch", "batches", "loss_sum", "seconds"}
CHECKPOINT_KEYS = ("model", "optimizer", "args", "epoch", "history", "best_psnr", "rng", "scale", "version")


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks training to stop after the current batch, saving first;
    a second signal stops at once (checkpoints already written stay intact: writes are atomic)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict = {}

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print("\nstopping after this batch (signal again to stop at once)", file=sys.stderr)

    def __enter__(self) -> "StopRequest":
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup'ed runs keep ignoring SIGINT
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------- one step, and a batch for it


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    border: int = 0,
    chunk: int | None = CPU_CHUNK,
    amp: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One MSE/Adam update on a batch; returns its loss, taken `border` pixels in from the edges.

    The batch passes through the network `chunk` patches at a time with the gradients summed: the
    same update as the whole batch at once, but on a CPU the activations stay in cache (measured
    1.5x faster at batch 128). None = the whole batch at once (the GPU's way). `amp` runs the
    forward pass under CUDA autocast in that dtype; `scaler` scales the fp16 loss.
    """
    optimizer.zero_grad(set_to_none=True)
    pairs = list(zip(inputs.split(chunk or len(inputs)), targets.split(chunk or len(inputs)), strict=True))
    losses = []
    for i, (x, y) in enumerate(pairs):
        last = i == len(pairs) - 1  # DDP averages gradients across processes once, after the last chunk
        with contextlib.ExitStack() as context:
            if not last and isinstance(model, DistributedDataParallel):
                context.enter_context(model.no_sync())
            with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
                out = model(x)
            out = out.float()
            if border:
                out, y = out[..., border:-border, border:-border], y[..., border:-border, border:-border]
            loss = F.mse_loss(out, y) * (len(x) / len(inputs))
            (scaler.scale(loss) if scaler else loss).backward()
        losses.append(loss.detach())
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return torch.stack(losses).sum().item()


def make_batch(
    patches: TrainingPatches, index: torch.Tensor, transform: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 patches -> float [0, 1] on `device`, under one of the 8 flips/rotations (0 = none)."""
    pair = []
    for source in (patches.inputs, patches.targets):
        x = source[index].to(device, non_blocking=True).float().div_(255)
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


# ---------------------------------------------------------------- the training loop


def build(args: dict, device: torch.device) -> tuple[SRCNN, torch.optim.Optimizer]:
    model = SRCNN()
    if args["init"] == "identity":
        init_identity_(model)
    model = model.to(device).to(memory_format=torch.channels_last)
    return model, torch.optim.Adam(model.parameters(), lr=args["lr"])


def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, weight by weight: an average over the last
    ~1 / (1 - decay) steps, steadier than the last step's weights."""
    with torch.no_grad():
        for average, weight in zip(ema.parameters(), model.parameters(), strict=True):
            average.lerp_(weight, 1 - decay)


def cpu_weights(model: nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def checkpoint_dict(
    model, ema, optimizer, args, epoch, history, best_psnr, generator, commands, position=None
) -> dict:
    """The plain dict every checkpoint is: tensors and primitives only (loads with weights_only).
    'model' holds the weights to use: the moving average when --ema-decay is on, whose training
    weights then go to 'training_weights' so that resume continues them."""
    return {
        "model": cpu_weights(ema if ema is not None else model),
        "training_weights": cpu_weights(model) if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "args": dict(args),
        "epoch": epoch,
        "history": list(history),
        "best_psnr": best_psnr,
        "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state()},
        "scale": args["scale"],
        "version": info.VERSION,
        "position": position,  # mid-epoch progress (interrupted.pth only), else None
        "commands": list(commands),  # every train/resume command line that led here, with its start epoch
    }


def setup_processes(args: dict) -> tuple[torch.device, int, int]:
    """(device, rank, world size): one process, or one of several started by torchrun (DDP)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return choose_device(args["cuda"]), 0, 1
    local_rank = int(os.environ["LOCAL_RANK"])
    device = choose_device(args["cuda"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if args["batch_size"] % world:
        raise UserError(f"--batch-size {args['batch_size']} must be a multiple of the {world} processes")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world


def amp_settings(args: dict, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    if args.get("amp", "off") == "off":
        return None, None
    if device.type != "cuda":
        print("note: --amp applies to CUDA only; training on the CPU in float32", file=sys.stderr)
        return None, None
    dtype = torch.bfloat16 if args["amp"] == "bf16" else torch.float16
    return dtype, torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def fit(args: dict, state: dict | None = None, command: str | None = None) -> int:
    """Train until args['num_epoch'] epochs are done, from scratch or from a checkpoint `state`.

    Under torchrun every process trains on its share of each batch (DistributedSampler, DDP);
    only rank 0 evaluates, prints and writes checkpoints.
    """
    device, rank, world = setup_processes(args)
    try:
        status = train_processes(args, state, device, rank, world, command)
        if world > 1:
            dist.barrier()  # rank 0 still evaluates and saves: tear the group down together, not while in use
        return status
    finally:
        if world > 1:
            dist.destroy_process_group()


def train_processes(
    args: dict, state: dict | None, device: torch.device, rank: int, world: int, command: str | None
) -> int:
    main_process = rank == 0
    data_root = Path(args["data_root"])
    patches = TrainingPatches(
        data_root / args["train_set"], args["scale"], args["patch_size"], args["stride"], args["zooms"]
    )
    eval_pairs = load_pairs(data_root / args["eval_set"], args["scale"])
    out_dir = Path(args["checkpoint_dir"])
    chunk = CPU_CHUNK if device.type == "cpu" else None
    amp, scaler = amp_settings(args, device)
    if main_process:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create checkpoint folder {out_dir}: {err.strerror or err}") from None
        if not os.access(out_dir, os.W_OK):
            raise UserError(f"checkpoint folder {out_dir} is not writable")

    seed_everything(args["seed"])
    net, optimizer = build(args, device)
    generator = torch.Generator().manual_seed(args["seed"])
    epoch, history, best_psnr, position = 0, [], -math.inf, None
    if state is not None:
        net.load_state_dict(state.get("training_weights") or state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, history, best_psnr = state["epoch"], state["history"], state["best_psnr"]
        torch.set_rng_state(state["rng"]["torch"])
        generator.set_state(state["rng"]["generator"])
        position = state.get("position")
    ema = None
    if args["ema_decay"]:
        ema = copy.deepcopy(net)  # from a checkpoint's 'model': its average, or its weights if it had none
        if state is not None:
            ema.load_state_dict(state["model"])
    commands = (state or {}).get("commands", []) + ([{"epoch": epoch, "command": command}] if command else [])
    model = DistributedDataParallel(net) if world > 1 else net
    if main_process:
        print(
            f"training on {len(patches)} patches of {args['patch_size']}x{args['patch_size']} from "
            f"{data_root / args['train_set']}, {device} x {world} process(es), epochs {epoch + 1}..{args['num_epoch']}",
            file=sys.stderr,
        )

    with StopRequest() as stop:
        while epoch < args["num_epoch"]:
            epoch_state = generator.get_state()  # an interrupted epoch replays its draws from here
            position = position or {"batch": 0, "loss_sum": 0.0, "seconds": 0.0}
            done, loss_sum, seconds = position["batch"], position["loss_sum"], position["seconds"]
            position = None
            if args["fresh_crops"]:
                patches.reshuffle_grid(generator)
            sampler = DistributedSampler(range(len(patches)), world, rank, shuffle=True, seed=args["seed"])
            sampler.set_epoch(epoch)
            batches = torch.tensor(list(sampler)).split(args["batch_size"] // world)
            transforms = torch.randint(8 if args["augment"] else 1, (len(batches),), generator=generator)
            model.train()
            start = time.perf_counter() - seconds
            bar = tqdm(total=len(batches), initial=done, desc=f"epoch {epoch + 1}", leave=False, file=sys.stderr,
                       disable=not main_process)
            for i in range(done, len(batches)):
                if stop_requested(stop, world):
                    break
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(args, epoch + i / len(batches))
                inputs, targets = make_batch(patches, batches[i], int(transforms[i]), device)
                loss = train_step(model, optimizer, inputs, targets, args["loss_border"], chunk, amp, scaler)
                if ema is not None:
                    update_ema(ema, net, args["ema_decay"])
                if not math.isfinite(loss):
                    bar.close()
                    raise UserError(
                        f"loss became {loss} at epoch {epoch + 1}, batch {i + 1}; training stopped, "
                        f"checkpoints in {out_dir} are untouched (try a lower --lr)"
                    )
                loss_sum += loss * len(batches[i])
                done = i + 1
                bar.update()
                if done % 10 == 0:
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(loss=f"{loss:.5f}", patches_s=f"{done * args['batch_size'] / elapsed:.0f}")
            bar.close()
            seconds = time.perf_counter() - start
            if done < len(batches):  # stopped mid-epoch: save where we are, to resume exactly here
                generator.set_state(epoch_state)
                position = {"batch": done, "batches": len(batches), "loss_sum": loss_sum, "seconds": seconds}
                ckpt = checkpoint_dict(
                    net, ema, optimizer, args, epoch, history, best_psnr, generator, commands, position
                )
                return save_interrupted(ckpt, out_dir, stop.signum, main_process)
            epoch += 1
            loss_sum = all_processes_sum(loss_sum, world)
            if not main_process:
                continue
            used = ema if ema is not None else net
            used.eval()
            scores = evaluate(used, eval_pairs, args["scale"])
            record = {
                "epoch": epoch,
                "loss": loss_sum / len(patches),
                "psnr": scores["psnr"],
                "ssim": scores["ssim"],
                "seconds": seconds,
                "patches_per_s": len(patches) / seconds,
                "lr": optimizer.param_groups[0]["lr"],
            }
            history.append(record)
            print(
                f"epoch {epoch:4d}  loss {record['loss']:.6f}  {args['eval_set']} PSNR {record['psnr']:.3f} dB  "
                f"SSIM {record['ssim']:.4f}  {seconds:.1f} s  ({record['patches_per_s']:.0f} patches/s)",
                flush=True,
            )
            improved = record["psnr"] > best_psnr
            best_psnr = max(best_psnr, record["psnr"])
            ckpt = checkpoint_dict(net, ema, optimizer, args, epoch, history, best_psnr, generator, commands)
            save_checkpoint(ckpt, out_dir / "last.pth")
            if improved:
                save_checkpoint(ckpt, out_dir / "best.pth")
            if epoch % args["save_freq"] == 0 or epoch == args["num_epoch"]:
                save_checkpoint(ckpt, out_dir / f"checkpoint.{epoch}.pth")
            if stop.signum and world == 1:
                return save_interrupted(ckpt, out_dir, stop.signum, main_process)
    if main_process:
        print(f"done: best {args['eval_set']} PSNR {best_psnr:.3f} dB; checkpoints in {out_dir}", file=sys.stderr)
    return 0


def stop_requested(stop: StopRequest, world: int) -> bool:
    """Whether any process got a stop signal: all processes must stop at the same batch."""
    if world == 1:
        return stop.signum is not None
    flag = torch.tensor([0 if stop.signum is None else stop.signum])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    stop.signum = int(flag) or None
    return stop.signum is not None


def all_processes_sum(value: float, world: int) -> float:
    if world == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total)


def save_interrupted(checkpoint: dict, out_dir: Path, signum: int, main_process: bool = True) -> int:
    if main_process:
        path = out_dir / "interrupted.pth"
        save_checkpoint(checkpoint, path)
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


# ---------------------------------------------------------------- inspect and evaluate


def count_parameters(state: dict) -> int:
    return sum(v.numel() for v in state.values())


def inspect(path: str, as_json: bool, plot: str | None) -> int:
    _, scale, state = load_model(path, torch.device("cpu"))
    history = state.get("history", [])
    summary = {
        "path": path,
        "version": state.get("version"),
        "scale": scale,
        "epoch": state.get("epoch"),
        "parameters": count_parameters(state.get("model", state)),
        "best_psnr": state.get("best_psnr"),
        "last_psnr": history[-1]["psnr"] if history else None,
        "args": state.get("args", {}),
        "commands": state.get("commands", []),
        "position": state.get("position"),
        "history": history,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{path}: SRCNN x{scale}, {summary['parameters']:,} parameters, epoch {summary['epoch']}, "
          f"version {summary['version']}")
    if summary["position"]:
        print(f"  interrupted in epoch {summary['epoch'] + 1} after batch {summary['position']['batch']} of "
              f"{summary['position']['batches']}: resume continues from there")
    for key, value in sorted(summary["args"].items()):
        print(f"  {key:14s} {value}")
    for run in summary["commands"]:
        print(f"  from epoch {run['epoch']}: {run['command']}")
    if history:
        print(f"best PSNR {summary['best_psnr']:.3f} dB, last PSNR {summary['last_psnr']:.3f} dB")
        print(f"{'epoch':>6} {'loss':>10} {'PSNR':>8} {'SSIM':>7} {'lr':>9} {'time s':>8} {'patches/s':>10}")
        for h in history:
            print(f"{h['epoch']:6d} {h['loss']:10.6f} {h['psnr']:8.3f} {h['ssim']:7.4f} {h.get('lr', 0):9.2e} "
                  f"{h['seconds']:8.1f} {h['patches_per_s']:10.0f}")
    if plot:
        if not history:
            raise UserError(f"{path} has no training history to plot")
        eval_set = summary["args"].get("eval_set", "evaluation set")
        panels = [("training loss (MSE, log scale)", [h["loss"] for h in history], True),
                  (f"{eval_set} Y-PSNR (dB)", [h["psnr"] for h in history], False)]
        save_image(plot_curves(panels, [h["epoch"] for h in history]), Path(plot))
        print(f"plot written to {plot}")
    return 0


def plot_curves(panels: list[tuple[str, list[float], bool]], epochs: list[int]) -> Image.Image:
    """Side-by-side line charts, one per (title, values, log scale), against epoch; Pillow only."""
    width, height = 560, 400
    canvas = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, values, log) in enumerate(panels):
        draw_panel(draw, (i * width + 72, 36, (i + 1) * width - 24, height - 44), title, epochs, values, log)
    return canvas


def draw_panel(draw: ImageDraw.ImageDraw, box: tuple, title: str, epochs: list[int], values: list[float], log: bool):
    font = ImageFont.load_default(size=14)
    x0, y0, x1, y1 = box
    ys = [math.log10(v) if log else v for v in values]
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1
    first, last = epochs[0], max(epochs[-1], epochs[0] + 1)

    def point(epoch: float, y: float) -> tuple[float, float]:
        return x0 + (epoch - first) / (last - first) * (x1 - x0), y1 - (y - lo) / (hi - lo) * (y1 - y0)

    draw.rectangle(box, outline="black")
    draw.text(((x0 + x1) / 2, y0 - 26), title, fill="black", font=font, anchor="mt")
    for k in range(5):
        y = lo + (hi - lo) * k / 4
        tick = point(first, y)[1]
        draw.line((x0 - 4, tick, x0, tick), fill="black")
        draw.text((x0 - 6, tick), f"{10**y:.1e}" if log else f"{y:.2f}", fill="black", font=font, anchor="rm")
        epoch = round(first + (last - first) * k / 4)
        draw.text((point(epoch, lo)[0], y1 + 6), str(epoch), fill="black", font=font, anchor="mt")
    draw.text(((x0 + x1) / 2, y1 + 26), "epoch", fill="black", font=font, anchor="mt")
    draw.line([point(e, y) for e, y in zip(epochs, ys, strict=True)], fill=(31, 119, 180), width=2)


def evaluate_command(
    path: str, sets: list[str], data_root: str, cuda: bool, self_ensemble: bool, scale: int | None
) -> int:
    device = choose_device(cuda)
    model, scale, _ = load_model(path, device, scale)
    all_pairs = {name: load_pairs(Path(data_root) / name, scale) for name in sets}  # a missing set: before any output
    print(f"{path}: x{scale}, Y-PSNR (dB) / SSIM, {scale}-pixel border shaved"
          + (", x8 self-ensemble" if self_ensemble else ""))
    print(f"{'set':8s} {'images':>6} {'bicubic':>16} {'SRCNN':>16}")
    for name, pairs in all_pairs.items():
        bicubic = evaluate(None, pairs, scale)
        ours = evaluate(model, pairs, scale, self_ensemble)
        print(f"{name:8s} {len(pairs):6d} {bicubic['psnr']:8.2f} / {bicubic['ssim']:.4f} "
              f"{ours['psnr']:8.2f} / {ours['ssim']:.4f}")
    return 0


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
    command = "python train.py " + shlex.join(argv)

    if args.command == "inspect":
        return inspect(args.checkpoint, args.json, args.plot)
    if args.command == "evaluate":
        return evaluate_command(
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
