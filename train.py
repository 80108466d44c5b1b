"""Train SRCNN and resume training; inspect and evaluate checkpoints (report.py draws and tables them).

    python train.py train --lr=0.001 --batch-size=128 --num-epoch=20 --save-freq=2
    python train.py train @recipes/x3.args        # a shipped model's recipe (recipes/)
    python train.py resume checkpoints/last.pth --num-epoch=200
    python train.py inspect checkpoints/best.pth
    python train.py evaluate checkpoint.pth --sets Set5 Set14

Read top to bottom: one step (train_step, on a batch that make_batch draws, at the rate
learning_rate gives), then the Trainer, which holds a run (weights, Adam, the moving average,
mixed precision, where it stands) and runs it batch by batch (run_batch), epoch by epoch
(run_epoch), evaluating and saving at the end of each (end_epoch, save); then the command line.
Under torchrun the processes agree, every CHECK_EVERY batches, on whether to go on (processes.py).
"""

import argparse
import contextlib
import copy
import math
import re
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import checkpoint
import info
from data import DEGRADATIONS, ImagePairs, TrainingPatches, held_bytes, rgb_to_y
from download import default_data_root
from files import removed_if_left_empty, writable_folder
from metrics import evaluate
from model import ASSIGNMENT, SRCNN, Shape, init_identity_
from processes import Processes, StopRequest
from report import EVALUATION_SETS, evaluate_checkpoint, inspect_checkpoints
from streaming import StreamedPatches
from utils import HelpFormatter, UserError, run_cli, seed_everything

PASS_PIXELS = 35_000  # patch pixels per forward/backward pass on a CPU (see cpu_pass)
CHECK_EVERY = 10  # batches between checks of the loss and of stop signals: the only host synchronisations


# ---------------------------------------------------------------- one step, and a batch for it


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
               autocast: torch.autocast, scaler: torch.amp.GradScaler, border: int = 0,
               pass_patches: int | None = None) -> torch.Tensor:
    """One MSE/Adam update on a batch; its loss (`border` pixels in from the patch edges) as a tensor
    on the device, so that nothing waits for the device. The batch passes through the network in
    passes of equal size (within one patch), at most `pass_patches` each, with the gradients summed:
    the same update, but on a CPU the activations stay in cache (see cpu_pass); None = all at once
    (the GPU's way). `autocast`: the forward pass's mixed-precision context and `scaler` the fp16
    loss scaler, both disabled but for --amp on CUDA."""
    optimizer.zero_grad(set_to_none=True)
    passes = -(-len(inputs) // (pass_patches or len(inputs)))
    pairs = list(zip(inputs.tensor_split(passes), targets.tensor_split(passes), strict=True))
    total = torch.zeros((), device=inputs.device)
    for i, (x, y) in enumerate(pairs):
        last = i == len(pairs) - 1  # DDP averages gradients across processes once, after the last pass
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast:
                out = model(x)
            out = out.float()
            if border:
                out, y = out[..., border:-border, border:-border], y[..., border:-border, border:-border]
            loss = F.mse_loss(out, y) * (len(x) / len(inputs))
            scaler.scale(loss).backward()
        total += loss.detach()
    scaler.step(optimizer)
    scaler.update()
    return total


def cpu_pass(patch_size: int, batch_size: int) -> int:
    """Patches per forward/backward pass on a CPU: passes of about 35k pixels, of equal size
    (16 patches of 48x48 in one pass, 128 of 33x33 as 4 of 32, 8 of 96x96 as 4 + 4), so that a pass's
    activations stay in cache. Measured (docs/speed.md) with freed memory reused, as training does
    (processes.reuse_freed_memory): on a 2-core AMD EPYC with AVX-512 the step took the same time in
    passes of 18k to 74k pixels, 1.2x as long in passes of 12k (128 of 33x33) and of 140k (the whole
    batch); with AVX2 the x3 recipe's epoch ran as fast in passes of 12k as of 35k. Smaller passes,
    chosen per CPU before, had looked faster only in probes that did not reuse freed memory, where a
    large pass's activations were faulted in afresh every step. The same on every CPU, so that the
    same command trains the same weights wherever the CPU computes the same sums."""
    passes = max(1, round(batch_size * patch_size**2 / PASS_PIXELS))
    return -(-batch_size // passes)


def last_layer_by_phase(device: torch.device) -> bool:
    """Whether training computes the last layer by phase (model.conv_by_phase): on a CPU with
    AVX-512, whose convolutions fill blocks of 16 output channels, it ran the step faster (16 of
    48x48: 23.8 ms against 27.5 plain on an AMD EPYC, 3-6% less on an Intel Xeon); with AVX2 (blocks
    of 8) 3-5% slower, before its backward took the input's gradient the plain way; the GPU has no
    such blocks (docs/speed.md)."""
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX512"


def make_batch(inputs: torch.Tensor, targets: torch.Tensor, transform: int,
               luma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's uint8 RGB patches -> float [0, 1] on their device, under one of the 8 flips/rotations
    (0 = none); with `luma`, their Y channel (the metric's, / 255) for a Y network."""
    pair = []
    for source in (inputs, targets):
        x = source.float()
        x = rgb_to_y(x).unsqueeze(-3).div_(255) if luma else x.div_(255)
        if transform & 4:
            x = x.flip(-1)
        if transform & 3:  # rot90 copies even by 0 turns
            x = x.rot90(transform & 3, (-2, -1))
        pair.append(x.contiguous(memory_format=torch.channels_last))
    return pair[0], pair[1]


def transform_table(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """8 x size² pixel orders: row t, gathered from a size x size patch's pixels, gives make_batch's
    flip/rotation t of it, value for value. A gather of a row picked on the device keeps the batch's
    operations the same for all eight, as a CUDA graph needs."""
    grid = torch.arange(size * size, device=device).view(size, size)
    return torch.stack([(grid.flip(-1) if t & 4 else grid).rot90(t & 3, (-2, -1)).flatten() for t in range(8)])


def graph_batch(source: torch.Tensor, table: torch.Tensor, transform: torch.Tensor, luma: bool) -> torch.Tensor:
    """make_batch's float batch of the uint8 patches `source`, value for value, its flip/rotation
    given as a tensor on the device (`transform`, a row of transform_table's `table`)."""
    x = source.float()
    x = rgb_to_y(x).unsqueeze(-3).div_(255) if luma else x.div_(255)
    order = table.index_select(0, transform.view(1)).view(-1)
    return x.flatten(-2).index_select(-1, order).view(x.shape).contiguous(memory_format=torch.channels_last)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate; one held as a tensor on the GPU (CapturedStep) is filled in place."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


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


def mixed_precision(args: dict, device: torch.device) -> tuple[torch.autocast, torch.amp.GradScaler]:
    """(the forward pass's autocast, the loss scaler) for --amp: bf16 autocast, or fp16 autocast with
    a loss scaler, on CUDA; both present and disabled otherwise."""
    amp = args.get("amp", "off")
    if amp != "off" and device.type != "cuda":
        print("note: --amp applies to CUDA only; training on the CPU in float32", file=sys.stderr)
    on = amp != "off" and device.type == "cuda"
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    # no autocast cache: each weight is cast once a pass anyway, and a CUDA graph cannot capture the cache
    return (torch.autocast(device.type, dtype=dtype, enabled=on, cache_enabled=False),
            torch.amp.GradScaler(device.type, enabled=on and dtype == torch.float16))


class CapturedStep:
    """train.py's step on one CUDA device as a CUDA graph, captured once and replayed for every batch
    of the full batch size: a batch's uint8 patches are copied into the graph's input buffers, and the
    replay does the rest on the GPU with no Python and no wait for the host: the conversion to float,
    the flip/rotation (a gather by transform_table, the same operations for all eight), train_step's
    forward, backward and Adam (capturable, its learning rate a tensor on the GPU), and the moving
    average (its decay computed from Adam's step count on the GPU). The update is train_step's and
    update_ema's; batches of another size (an epoch's last) take the plain step. The first WARMUP
    batches run eagerly on a side stream, as CUDA graphs need. Why: at the recipe's batch of 16, the
    plain step kept an H200 waiting on Python and kernel launches most of the time (docs/gpus.md)."""

    WARMUP = 3

    def __init__(self, model: SRCNN, optimizer: torch.optim.Optimizer, ema: SRCNN | None, args: dict,
                 autocast: torch.autocast, scaler: torch.amp.GradScaler) -> None:
        self.model, self.optimizer, self.ema, self.args = model, optimizer, ema, args
        self.autocast, self.scaler = autocast, scaler
        device = next(model.parameters()).device
        self.table = transform_table(args["patch_size"], device)
        self.transform = torch.zeros((), dtype=torch.long, device=device)
        self.inputs: torch.Tensor | None = None  # the graph's input buffers, made by the first batch
        self.targets: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        self.side, self.warmed = torch.cuda.Stream(device), 0

    @staticmethod
    def possible(args: dict, device: torch.device, world: int) -> str | None:
        """Why the step cannot be captured here (None: it can)."""
        if device.type != "cuda":
            return "not CUDA"
        if world > 1:
            return "several processes: DDP's gradient averaging is left uncaptured"
        if args["amp"] == "fp16":
            return "--amp fp16: the loss scaler reads its overflow check on the host every step"
        return None

    def body(self) -> torch.Tensor:
        """One step on the input buffers: what the graph holds."""
        luma = self.model.shape.channels == 1
        x, y = (graph_batch(source, self.table, self.transform, luma) for source in (self.inputs, self.targets))
        loss = train_step(self.model, self.optimizer, x, y, self.autocast, self.scaler, self.args["loss_border"])
        if self.ema is not None:
            step = self.optimizer.state[next(self.model.parameters())]["step"]
            weight = 1 - torch.clamp((1 + step) / (10 + step), max=self.args["ema_decay"])  # update_ema's decay
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), weight)
        return loss

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, transform: int) -> torch.Tensor:
        """The step on these patches under flip/rotation `transform`; its loss (mean over the batch) on
        the device. The learning rate is the optimizer's tensor, set before (set_learning_rate)."""
        if self.inputs is None:
            self.inputs, self.targets = torch.empty_like(inputs), torch.empty_like(targets)
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        self.transform.fill_(transform)
        if self.graph is not None:
            self.graph.replay()
            return self.loss
        if self.warmed < self.WARMUP:  # eager steps on a side stream, so that the capture finds all set up
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                loss = self.body()
            torch.cuda.current_stream().wait_stream(self.side)
            self.warmed += 1
            return loss
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # recorded, not run: the replay below runs it
            self.loss = self.body()
        self.graph.replay()
        return self.loss


def capturable(optimizer: torch.optim.Optimizer) -> None:
    """Make a (loaded) Adam capturable in place: its learning rate a tensor on the weights' device, and
    its step counts there too. checkpoint.training_checkpoint saves it as a plain Adam again."""
    device = optimizer.param_groups[0]["params"][0].device
    for group in optimizer.param_groups:
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
    for state in optimizer.state.values():
        state["step"] = state["step"].to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------- a run


class Trainer:
    """One training run in one process: the data, the weights Adam trains (wrapped in DDP under
    torchrun), the moving average that is evaluated and saved (--ema-decay), mixed precision, the
    generator of every random draw of crops, batch flips and rotations, and the run's progress.
    Process 0 ("main") alone evaluates, prints and writes checkpoints."""

    def __init__(self, args: dict, processes: Processes, resumed: dict | None = None,
                 init_weights: dict | None = None, command: str | None = None) -> None:
        self.args, self.processes, self.out_dir = args, processes, Path(args["checkpoint_dir"])
        self.patches, self.eval_pairs = processes.agree(load_data, args, processes)
        seed_everything(args["seed"])
        model = SRCNN(checkpoint.shape_of_args(args))
        model.last_layer_by_phase = last_layer_by_phase(processes.device)  # the same sums and weights
        if args["init"] == "identity":
            init_identity_(model)
        elif init_weights is not None and resumed is None:  # a resumed run has its own weights
            model.load_state_dict(init_weights)
        self.model = model.to(processes.device, memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args["lr"])
        self.generator = torch.Generator().manual_seed(args["seed"])
        self.ema = copy.deepcopy(self.model) if args["ema_decay"] else None
        self.autocast, self.scaler = mixed_precision(args, processes.device)
        self.progress = checkpoint.Progress() if resumed is None else checkpoint.restore_training(
            resumed, self.model, self.ema, self.optimizer, self.scaler, self.generator)
        if command:
            self.progress.commands.append({"epoch": self.progress.epoch, "command": command})
        self.ddp_model = processes.wrap(self.model)
        self.captured = None
        if processes.device.type == "cuda":
            why_not = CapturedStep.possible(args, processes.device, processes.world)
            if why_not is None:
                capturable(self.optimizer)
                self.captured = CapturedStep(self.model, self.optimizer, self.ema, args, self.autocast, self.scaler)
            processes.say("CUDA step: " + (f"plain ({why_not})" if why_not else "captured as a CUDA graph, replayed"))
        self.pass_patches = None  # the GPU's way: the whole batch at once
        if processes.device.type == "cpu":  # passes whose activations stay in cache
            why = "as given or recorded"
            if args["pass_patches"] is None:  # chosen now and recorded, so that resume passes the same
                args["pass_patches"] = cpu_pass(args["patch_size"], args["batch_size"] // processes.world)
                why = f"about {PASS_PIXELS:,} pixels each"
            self.pass_patches = args["pass_patches"]
            processes.say(f"CPU step: passes of at most {self.pass_patches} patches ({why}), the last layer "
                          + ("by phase" if model.last_layer_by_phase else "plain"))

    @property
    def eval_model(self) -> SRCNN:
        return self.ema if self.ema is not None else self.model

    def run(self) -> int:
        """Train until args['num_epoch'] epochs are done; 128 + the signal if one stopped it."""
        args, progress = self.args, self.progress
        self.processes.say(f"training on {len(self.patches)} patches of {args['patch_size']}x{args['patch_size']} "
                           f"from {', '.join(map(str, training_folders(args)))}, {self.processes}, "
                           f"epochs {progress.epoch + 1}..{args['num_epoch']}")
        with StopRequest() as stop:
            while progress.epoch < args["num_epoch"]:
                record, signum = self.run_epoch(stop)
                if record is not None:
                    self.processes.agree(self.end_epoch, record)
                if signum:  # mid-epoch, or at the end of one: every process agreed to stop here
                    return self.processes.agree(self.save_interrupted, signum)
        self.processes.say(f"done: best {args['eval_set']} PSNR {progress.best_psnr:.3f} dB; "
                           f"checkpoints in {self.out_dir}")
        return 0

    def run_batch(self, index: torch.Tensor, transform: int, progress: float) -> torch.Tensor:
        """One step on the patches at `index` under flip/rotation `transform`, at the learning rate
        of `progress` (epochs done); its loss summed over the batch, on the device."""
        set_learning_rate(self.optimizer, learning_rate(self.args, progress))
        inputs, targets = self.patches.take(index)
        if self.captured is not None and len(index) == self.args["batch_size"]:
            return self.captured(inputs, targets, transform) * len(index)
        inputs, targets = make_batch(inputs, targets, transform, self.model.shape.channels == 1)
        loss = train_step(self.ddp_model, self.optimizer, inputs, targets, self.autocast, self.scaler,
                          self.args["loss_border"], self.pass_patches)
        if self.ema is not None:
            update_ema(self.ema, self.model, self.args["ema_decay"], optimizer_steps(self.optimizer))
        return loss * len(index)

    def draw_epoch(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """This epoch's random draws: its patches (the grid's offset, with --fresh-crops), the patch
        indices of each of this process's batches, and each batch's flip/rotation (with --augment)."""
        args = self.args
        self.patches.new_epoch(self.generator, move_grid=args["fresh_crops"])
        batches = self.patches.batches(args["batch_size"], self.processes, args["seed"], self.progress.epoch)
        return batches, torch.randint(8 if args["augment"] else 1, (len(batches),), generator=self.generator)

    def run_epoch(self, stop: StopRequest) -> tuple[dict | None, int | None]:
        """One epoch of steps (from progress.position, if an interrupted one is resumed). Returns the
        training part of its history record (None if stopped mid-epoch: progress.position then says
        where, and the generator is back at the epoch's start so that resume replays its draws) and
        the stop signal every process agreed on at the last check (None: go on)."""
        args, progress, processes = self.args, self.progress, self.processes
        epoch_start = self.generator.get_state()
        position = progress.position or {"batch": 0, "loss_sum": 0.0, "seconds": 0.0}
        batches, transforms = self.draw_epoch()
        loss_sum = torch.tensor(position["loss_sum"] if processes.main else 0.0, dtype=torch.float64,
                                device=processes.device)  # summed on the device: no wait for it per step
        start = time.perf_counter() - position["seconds"]
        self.ddp_model.train()
        with tqdm(total=len(batches), initial=position["batch"], desc=f"epoch {progress.epoch + 1}", leave=False,
                  file=sys.stderr, disable=not processes.main) as bar:
            for i in range(position["batch"], len(batches)):
                loss_sum += self.run_batch(batches[i], int(transforms[i]), progress.epoch + i / len(batches))
                bar.update()
                done, seconds = i + 1, time.perf_counter() - start
                if done % CHECK_EVERY == 0 or done == len(batches):
                    total, signum = self.check(loss_sum, stop, done)
                    bar.set_postfix(loss=f"{total / (done * args['batch_size']):.5f}",
                                    patches_s=f"{done * args['batch_size'] / seconds:.0f}")
                    if signum and done < len(batches):
                        self.generator.set_state(epoch_start)
                        progress.position = {"batch": done, "batches": len(batches), "loss_sum": total,
                                             "seconds": seconds}
                        return None, signum
        progress.position = None
        record = {"loss": total / len(self.patches), "seconds": seconds, "patches_per_s": len(self.patches) / seconds,
                  "lr": float(self.optimizer.param_groups[0]["lr"])}
        return record, signum

    def check(self, loss_sum: torch.Tensor, stop: StopRequest, done: int) -> tuple[float, int | None]:
        """(the epoch's loss sum so far over all processes, the stop signal they agreed on); a loss that
        is not finite in any process stops every process here, before any checkpoint is written."""
        total, signum = self.processes.check(loss_sum, stop.signum)
        if not math.isfinite(total):
            raise UserError(f"loss became {total} in epoch {self.progress.epoch + 1} by batch {done}; training "
                            f"stopped, checkpoints in {self.out_dir} are untouched (try a lower --lr)")
        return total, signum

    def end_epoch(self, record: dict) -> None:
        """Count the epoch; on rank 0 evaluate it (in PyTorch), print and record it, and save."""
        progress, args = self.progress, self.args
        progress.epoch += 1
        if not self.processes.main:
            return
        self.eval_model.eval()
        scores = evaluate(self.eval_model, self.eval_pairs, args["scale"])
        record = {"epoch": progress.epoch, "loss": record["loss"], "psnr": scores["psnr"], "ssim": scores["ssim"],
                  **record}
        progress.history.append(record)
        print(f"epoch {progress.epoch:4d}  loss {record['loss']:.6f}  {args['eval_set']} PSNR {record['psnr']:.3f} dB"
              f"  SSIM {record['ssim']:.4f}  {record['seconds']:.1f} s  ({record['patches_per_s']:.0f} patches/s)",
              flush=True)
        improved = record["psnr"] > progress.best_psnr
        progress.best_psnr = max(progress.best_psnr, record["psnr"])
        names = [checkpoint.LAST] + [checkpoint.BEST] * improved
        if progress.epoch % args["save_freq"] == 0 or progress.epoch == args["num_epoch"]:
            names.append(checkpoint.numbered(progress.epoch))
        self.save(*names)

    def save(self, *names: str) -> None:
        """Write the run's checkpoint under each of `names` in its folder."""
        state = checkpoint.training_checkpoint(self.args, self.progress, self.model, self.ema, self.optimizer,
                                               self.scaler, self.generator)
        for name in names:
            checkpoint.save(state, self.out_dir / name)

    def save_interrupted(self, signum: int) -> int:
        if self.processes.main:
            self.save(checkpoint.INTERRUPTED)
            path = self.out_dir / checkpoint.INTERRUPTED
            print(f"interrupted: saved {path}; continue with: python train.py resume {path}", file=sys.stderr)
        return 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def load_data(args: dict, processes: Processes) -> tuple[TrainingPatches | StreamedPatches, ImagePairs | list]:
    """The training patches (on the training device) and, for rank 0, the evaluation pairs (read an
    image at a time at every evaluation); rank 0 also makes sure the checkpoint folder can be
    written before any training."""
    root, folders = Path(args["data_root"]), training_folders(args)
    kinds = len(DEGRADATIONS) if args["degradation"] == "mixed" else 1
    needed, budget = held_bytes(folders, args["scale"], args["zooms"], kinds), parse_bytes(args["data_memory"])
    if needed <= budget:  # all at once: the same batches as ever
        patches = TrainingPatches(folders, args["scale"], args["patch_size"], args["stride"],
                                  args["zooms"], processes.device, args["degradation"])
    else:  # a part at a time, each process its own share
        processes.say(f"the training images take {needed / 1e3:,.0f} KB, more than --data-memory "
                      f"{args['data_memory']}: streamed in parts of up to {budget // 2 / 1e3:,.0f} KB a process")
        patches = StreamedPatches(folders, args["scale"], args["patch_size"], args["stride"], args["zooms"],
                                  processes.device, args["degradation"], budget, args["workers"],
                                  processes.rank, processes.world)
    if not processes.main:
        return patches, []
    writable_folder(Path(args["checkpoint_dir"]), "checkpoint folder")
    evaluated_as = "matlab" if args["degradation"] == "matlab" else "pil"  # mixed training: evaluated on Pillow's
    return patches, ImagePairs(root / args["eval_set"], args["scale"], degradation=evaluated_as)


def training_folders(args: dict) -> list[Path]:
    """The --train-set folders: each a name under --data-root, or else a path to a folder."""
    root = Path(args["data_root"])
    return [root / name if (root / name).is_dir() or not Path(name).is_dir() else Path(name)
            for name in checkpoint.training_sets(args)]


def fit(args: dict, resumed: dict | None = None, init_weights: dict | None = None, command: str | None = None) -> int:
    """Train from scratch (from `init_weights` if given) or from the checkpoint `resumed`. Under
    torchrun each process trains on its share of every batch (DDP); a run that fails before its
    first checkpoint leaves no folder behind."""
    with removed_if_left_empty(Path(args["checkpoint_dir"])), Processes.start(args["cuda"], args["batch_size"]) as p:
        return Trainer(args, p, resumed, init_weights, command).run()


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
    flag("--train-set", nargs="+", default=["T91"], metavar="SET",
         help="training set folder(s): names under --data-root, or paths, e.g. T91 ~/photos")
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
    flag("--data-memory", type=byte_size, default="2GB", metavar="SIZE",
         help="the most memory the training images may take (8-bit pixels, each zoom a copy), e.g. 500MB or 8GB; "
              "a larger set is streamed a part at a time")
    flag("--workers", type=int, default=2, help="processes that read the next part of a streamed set while one trains")
    flag("--pass-patches", type=int, default=None, metavar="N",
         help="on a CPU, the most patches a forward/backward pass takes, the batch in passes of equal size "
              "(default: chosen for this CPU, and recorded)")
    flag("--network", type=filter_sizes, default=ASSIGNMENT.name, metavar="F1-F2-F3",
         help="the three layers' filter sizes, odd, e.g. 9-5-5 or 9-3-5 (the paper's studies)")
    flag("--widths", type=int, nargs=2, default=list(ASSIGNMENT.widths), metavar=("N1", "N2"),
         help="the filters of the first two layers, e.g. 128 64")
    flag("--channels", choices=["rgb", "y"], default="rgb",
         help="what the network maps: RGB, or the Y channel (BT.601) as the paper's main tables, Cb and Cr "
              "then taken from the bicubic input")


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


def filter_sizes(text: str) -> str:
    """--network's value: three odd filter sizes joined by '-', as the paper names its networks."""
    try:
        return Shape(tuple(int(k) for k in text.split("-"))).name
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three odd filter sizes such as 9-5-5, not {text!r}") from None


def check_training_args(args: dict) -> None:
    """Every training flag within its range, so a bad value ends in one line, not deep in training."""
    for key in ("batch_size", "num_epoch", "save_freq", "patch_size", "stride"):
        if args[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1")
    if args["scale"] < 2:
        raise UserError("--scale must be at least 2")
    if not args["lr"] > 0:
        raise UserError("--lr must be positive")
    if args["pass_patches"] is not None and args["pass_patches"] < 1:
        raise UserError("--pass-patches must be at least 1")
    if args["workers"] < 0:
        raise UserError("--workers must be at least 0 (0: read in the training process)")
    if not 0 <= args["loss_border"] < args["patch_size"] // 2:
        raise UserError("--loss-border must be at least 0 and less than half the patch size")
    if not 0 <= args["ema_decay"] < 1:
        raise UserError("--ema-decay must lie in [0, 1)")
    if not all(0 < z <= 1 for z in args["zooms"]):
        raise UserError("--zooms must lie in (0, 1]: the training images are only ever shrunk")
    if not all(n >= 1 for n in args["widths"]):
        raise UserError("--widths must be at least 1")


def recipe_line_to_args(line: str) -> list[str]:
    """A line of an argument file (`train.py train @recipes/x3.args`) as the shell would split it,
    '#' to the end of the line a comment."""
    return shlex.split(line, comments=True)


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(the whole CLI, the `train` subcommand's parser, whose defaults fill options newer than a checkpoint).
    An argument @FILE stands for the arguments in FILE (recipes/)."""
    parser = argparse.ArgumentParser(description="Train and examine SRCNN models.", formatter_class=HelpFormatter,
                                     fromfile_prefix_chars="@")
    parser.convert_arg_line_to_args = recipe_line_to_args
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
                    "--model and --scale: checkpoint.pth for x3, models/srcnn_x2.pth, models/srcnn_x4.pth, ...)")
    ev.add_argument("--model", choices=checkpoint.SHIPPED_NETWORKS, help=checkpoint.MODEL_HELP)
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
    command = checkpoint.launch_command(argv)

    if args.command == "inspect":
        return inspect_checkpoints(args.checkpoints, args.json, args.plot, args.filters, args.history, args.reach)
    if args.command == "evaluate":
        path = str(checkpoint.chosen_checkpoint(args.checkpoint, args.scale, args.model, "name a checkpoint "
                                                "trained at that scale: python train.py evaluate CHECKPOINT"))
        return evaluate_checkpoint(path, args.sets, args.data_root, args.cuda, args.self_ensemble, args.scale,
                                   args.degradation, args.report)
    if args.command == "train":
        options = {k: v for k, v in vars(args).items() if k != "command"}
        check_training_args(options)
        init_weights = None
        if options["init"] not in ("default", "identity"):  # a bad --init CHECKPOINT ends here, before any work
            start = checkpoint.load_model(options["init"], torch.device("cpu"))[0]
            if start.shape != checkpoint.shape_of_args(options):
                raise UserError(f"--init {options['init']} holds SRCNN {start.shape}; this run trains "
                                f"{checkpoint.shape_of_args(options)} (--network, --widths, --channels)")
            init_weights = start.state_dict()
        return fit(options, init_weights=init_weights, command=command)
    resumed = checkpoint.load(args.checkpoint)
    checkpoint.check_resumable(args.checkpoint, resumed)
    given = {k: v for k, v in vars(args).items() if k not in ("command", "checkpoint")}
    options = checkpoint.resume_options(args.checkpoint, resumed, given, vars(train_parser.parse_args([])))
    check_training_args(options)
    return fit(options, resumed, command=command)


if __name__ == "__main__":
    run_cli(main)
