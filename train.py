"""Train SRCNN and resume training; inspect and evaluate checkpoints (report.py draws and tables them).

    python train.py train --lr=0.001 --batch-size=128 --num-epoch=20 --save-freq=2
    python train.py train @recipes/x3.args        # a shipped model's recipe (recipes/)
    python train.py resume checkpoints/last.pth --num-epoch=200
    python train.py inspect checkpoints/best.pth
    python train.py evaluate checkpoint.pth --sets Set5 Set14

Read top to bottom: the schedule (learning_rate), then the Trainer, which holds a run (weights,
Adam, the moving average, mixed precision, where it stands) and runs it batch by batch (run_batch,
each batch one step of step.py's, the one this device takes), epoch by epoch (run_epoch),
evaluating and saving at the end of each (end_epoch, save); then the command line, whose training
flags options.py defines. Under torchrun the processes agree, every CHECK_EVERY batches, on whether
to go on (processes.py).
"""

import argparse
import copy
import math
import shlex
import sys
import time
from pathlib import Path

import interrupts  # noqa: F401  (first: Ctrl-C while torch loads ends in one line)

import torch
from tqdm import tqdm

import checkpoint
import info
import step
import tensorboard_log
from data import DEGRADATIONS
from download import default_data_root
from files import removed_if_left_empty
from metrics import evaluate
from model import SRCNN, init_identity_
from options import add_training_flags, check_training_args, recipe_line_to_args, training_folders
from processes import Processes, StopRequest
from report import EVALUATION_SETS, evaluate_checkpoint, inspect_checkpoints
from training_data import fetch_sets_on_first_use, load_data
from utils import HelpFormatter, UserError, run_cli, seed_everything

CHECK_EVERY = 10  # batches between checks of the loss and of stop signals: the only host synchronisations


# ---------------------------------------------------------------- the schedule


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


# ---------------------------------------------------------------- a run


class Trainer:
    """One training run in one process: the data, the weights Adam trains (wrapped in DDP under
    torchrun), the moving average that is evaluated and saved (--ema-decay), mixed precision, the
    generator of every random draw of crops, batch flips and rotations, and the run's progress.
    Process 0 ("main") alone evaluates, prints and writes checkpoints."""

    def __init__(self, args: dict, processes: Processes, resumed: dict | None = None,
                 init_weights: dict | None = None, command: str | None = None, replacing: list[str] = ()) -> None:
        self.args, self.processes, self.out_dir = args, processes, Path(args["checkpoint_dir"])
        self.replacing = list(replacing)  # an earlier run's files (train --overwrite), removed at the first save
        processes.agree(fetch_sets_on_first_use, args, processes.main)  # process 0 fetches; the others wait
        self.patches, self.eval_pairs = processes.agree(load_data, args, processes)
        seed_everything(args["seed"])
        model = SRCNN(checkpoint.shape_of_args(args))
        if processes.device.type == "cpu" and args["pass_patches"] is None:  # chosen now and recorded, so
            args["pass_patches"] = step.cpu_pass(args["patch_size"], args["batch_size"] // processes.world)  # resume
        if step.needs_bf16_probe(args, processes.device):  # process 0 times the step; every process takes its choice
            args["bf16_probe"] = processes.from_main(step.bf16_probe, model, args["batch_size"] // processes.world,
                                                     args["patch_size"], args["pass_patches"], args["loss_border"])
        self.autocast, self.scaler = step.mixed_precision(args, processes.device)
        # the last layer by phase: the same sums and weights, faster where this CPU's blocks favour it
        model.last_layer_by_phase = step.last_layer_by_phase(processes.device, step.precision(self.autocast) == "bf16")
        if args["init"] == "identity":
            init_identity_(model)
        elif init_weights is not None and resumed is None:  # a resumed run has its own weights
            model.load_state_dict(init_weights)
        self.model = model.to(processes.device, memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args["lr"])
        self.generator = torch.Generator().manual_seed(args["seed"])
        self.ema = copy.deepcopy(self.model) if args["ema_decay"] else None
        self.progress = checkpoint.Progress() if resumed is None else checkpoint.restore_training(
            resumed, self.model, self.ema, self.optimizer, self.scaler, self.generator)
        self.run_entry = {"epoch": self.progress.epoch, "command": command,  # this command's record
                          "precision": step.precision(self.autocast)}
        if command:
            self.progress.commands.append(self.run_entry)
        self.ddp_model = processes.wrap(self.model)
        self.captured: step.CapturedStep | None = None
        self.pass_patches: int | None = None  # the GPU's way: the whole batch at once
        self.steps = step.optimizer_steps(self.optimizer)  # counted on from here on the host: the board's axis
        self.say_step(self.choose_step())
        self.board = tensorboard_log.open_board(args, self.steps, command, self.run_entry["step"], processes.main)

    def choose_step(self) -> str:
        """Set up the step this device takes (step.py); what it is, in words, its precision too."""
        args, device, world = self.args, self.processes.device, self.processes.world
        forward = f"the forward pass in {step.precision(self.autocast)}"
        if device.type == "cpu":  # passes whose activations stay in cache
            if args.get("bf16_probe"):
                forward += f" ({step.probe_figures(args['bf16_probe'])})"
            self.pass_patches = args["pass_patches"]
            why = (f"about {step.PASS_PIXELS:,} pixels each" if self.pass_patches == step.cpu_pass(args["patch_size"],
                   args["batch_size"] // world) else "as given or recorded")
            return (f"CPU step: passes of at most {self.pass_patches} patches ({why}), the last layer "
                    + ("by phase" if self.model.last_layer_by_phase else "plain") + f", {forward}")
        why_not = step.CapturedStep.possible(args, device, world)
        if why_not is not None:
            return f"CUDA step: plain ({why_not}), {forward}"
        step.capturable(self.optimizer)
        self.captured = step.CapturedStep(self.model, self.optimizer, self.ema, args, self.autocast, self.scaler)
        return (f"CUDA step: captured as a CUDA graph after {step.CapturedStep.WARMUP} plain batches, "
                f"if it then makes the plain step's update, {forward}")

    def say_step(self, text: str) -> None:
        """Print the step this run takes (on a line of its own, above an epoch's progress bar), and record
        it beside the run's command line."""
        with tqdm.external_write_mode(file=sys.stderr):
            self.processes.say(text)
        self.run_entry["step"] = text

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
        if self.board:
            self.board.finish(self.steps, args, progress.best_psnr, progress.history[-1]["psnr"])
        self.processes.say(f"done: best {args['eval_set']} PSNR {progress.best_psnr:.3f} dB; "
                           f"checkpoints in {self.out_dir}")
        return 0

    def run_batch(self, index: torch.Tensor, transform: int, progress: float) -> torch.Tensor:
        """One step on the patches at `index` under flip/rotation `transform`, at the learning rate
        of `progress` (epochs done); its loss summed over the batch, on the device."""
        step.set_learning_rate(self.optimizer, learning_rate(self.args, progress))
        self.steps += 1
        inputs, targets = self.patches.take(index)
        if self.captured is not None and len(index) == self.args["batch_size"]:
            loss = self.captured(inputs, targets, transform)
            if loss is not None:
                return loss * len(index)
            self.say_step(f"CUDA step: plain from epoch {self.progress.epoch + 1} on; {self.captured.failure}")
            self.captured = None
        inputs, targets = step.make_batch(inputs, targets, transform, self.model.shape.channels == 1)
        loss = step.train_step(self.ddp_model, self.optimizer, inputs, targets, self.autocast, self.scaler,
                          self.args["loss_border"], self.pass_patches)
        if self.ema is not None:
            step.update_ema(self.ema, self.model, self.args["ema_decay"], step.optimizer_steps(self.optimizer))
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
        left = args["num_epoch"] - progress.epoch  # under 1 in a fractional last epoch: that share of its batches
        steps = len(batches) if left >= 1 else max(1, round(left * len(batches)))
        loss_sum = torch.tensor(position["loss_sum"] if processes.main else 0.0, dtype=torch.float64,
                                device=processes.device)  # summed on the device: no wait for it per step
        start = time.perf_counter() - position["seconds"]
        window = (position["batch"], position["loss_sum"])  # (batches, loss sum) at the last check
        self.ddp_model.train()
        with tqdm(total=steps, initial=position["batch"], desc=f"epoch {progress.epoch + 1}", leave=False,
                  file=sys.stderr, disable=not processes.main) as bar:
            for i in range(position["batch"], steps):
                try:
                    loss_sum += self.run_batch(batches[i], int(transforms[i]), progress.epoch + i / len(batches))
                except UserError:  # a streamed image unreadable now: where the epoch stands is saved first
                    self.stopped_at(epoch_start, i, len(batches), float(loss_sum), time.perf_counter() - start)
                    self.save_interrupted(0)
                    raise
                bar.update()
                done, seconds = i + 1, time.perf_counter() - start
                if done % CHECK_EVERY == 0 or done == steps:
                    total, signum = self.check(loss_sum, stop, done)
                    if self.board:  # the loss of the batches since the last check, read there anyway
                        self.board.training(self.steps, (total - window[1]) / ((done - window[0]) * args["batch_size"]),
                                            learning_rate(args, progress.epoch + i / len(batches)),
                                            done * args["batch_size"] / seconds)
                    window = (done, total)
                    bar.set_postfix(loss=f"{total / (done * args['batch_size']):.5f}",
                                    patches_s=f"{done * args['batch_size'] / seconds:.0f}")
                    if signum and done < steps:
                        self.stopped_at(epoch_start, done, len(batches), total, seconds)
                        return None, signum
        progress.position = None
        trained = min(steps * args["batch_size"], len(self.patches))  # every process's share of the batches
        record = {"loss": total / trained, "seconds": seconds, "patches_per_s": trained / seconds,
                  "lr": learning_rate(args, progress.epoch + (steps - 1) / len(batches))}  # the last batch's
        return record, signum

    def stopped_at(self, epoch_start: torch.Tensor, done: int, batches: int, loss_sum: float, seconds: float) -> None:
        """Stop mid-epoch after `done` batches; the generator back at the epoch's start for resume to replay."""
        self.generator.set_state(epoch_start)
        self.progress.position = {"batch": done, "batches": batches, "loss_sum": loss_sum, "seconds": seconds}

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
        if self.board:
            self.board.epoch(self.steps, args, progress.history, self.eval_model, self.eval_pairs)
        improved = record["psnr"] > progress.best_psnr
        progress.best_psnr = max(progress.best_psnr, record["psnr"])
        names = [checkpoint.LAST] + [checkpoint.BEST] * improved
        if progress.epoch % args["save_freq"] == 0 or progress.epoch >= args["num_epoch"]:
            names.append(checkpoint.numbered(progress.epoch))
        self.save(*names)

    def save(self, *names: str) -> None:
        """Write the run's checkpoint under each of `names` in its folder."""
        state = checkpoint.training_checkpoint(self.args, self.progress, self.model, self.ema, self.optimizer,
                                               self.scaler, self.generator)
        for name in names:
            checkpoint.save(state, self.out_dir / name)
        if checkpoint.INTERRUPTED not in names:
            checkpoint.remove_if_passed(self.out_dir / checkpoint.INTERRUPTED, self.progress.epoch)
        for name in self.replacing:  # the earlier run's files this run has not written over
            if name not in names:
                (self.out_dir / name).unlink(missing_ok=True)
        self.replacing = []

    def save_interrupted(self, signum: int) -> int:
        if self.board:
            self.board.close()
        if self.processes.main:
            self.save(checkpoint.INTERRUPTED)
            path = self.out_dir / checkpoint.INTERRUPTED
            print(f"interrupted: saved {path}; continue with: python train.py resume {shlex.quote(str(path))}",
                  file=sys.stderr)
        return 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def fit(args: dict, resumed: dict | None = None, init_weights: dict | None = None, command: str | None = None,
        replacing: list[str] = ()) -> int:
    """Train from scratch (from `init_weights` if given) or from the checkpoint `resumed`. Under
    torchrun each process trains on its share of every batch (DDP); a run that fails before its
    first checkpoint leaves no folder behind, and an earlier run's files it is `replacing` stay
    until its first checkpoint is written."""
    with removed_if_left_empty(Path(args["checkpoint_dir"])), Processes.start(args["cuda"], args["batch_size"]) as p:
        return Trainer(args, p, resumed, init_weights, command, replacing).run()


# ---------------------------------------------------------------- command line


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
    train_parser.add_argument("--overwrite", action="store_true", help="start over in a --checkpoint-dir that "
                              "holds a run, replacing its checkpoints at this run's first save (default: refused)")
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
    insp.add_argument("--tensorboard", metavar="DIR", help="write each checkpoint's recorded history and command "
                      "lines as a TensorBoard run, DIR/<its folder>_<its name> (default: none)")
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
        return inspect_checkpoints(args.checkpoints, args.json, args.plot, args.filters, args.history, args.reach,
                                   args.tensorboard)
    if args.command == "evaluate":
        path = str(checkpoint.chosen_checkpoint(args.checkpoint, args.scale, args.model, "name a checkpoint "
                                                "trained at that scale: python train.py evaluate CHECKPOINT"))
        return evaluate_checkpoint(path, args.sets, args.data_root, args.cuda, args.self_ensemble, args.scale,
                                   args.degradation, args.report)
    if args.command == "train":
        options = {k: v for k, v in vars(args).items() if k not in ("command", "overwrite")}
        check_training_args(options)
        replacing = checkpoint.earlier_run(Path(options["checkpoint_dir"]), args.overwrite)
        if replacing:
            say = f"note: --overwrite: this run replaces {', '.join(replacing)} in {options['checkpoint_dir']}"
            print(say + " at its first save", file=sys.stderr)
        init_weights = None
        if options["init"] not in ("default", "identity"):  # a bad --init CHECKPOINT ends here, before any work
            start = checkpoint.load_model(options["init"], torch.device("cpu"))[0]
            if start.shape != checkpoint.shape_of_args(options):
                raise UserError(f"--init {options['init']} holds SRCNN {start.shape}; this run trains "
                                f"{checkpoint.shape_of_args(options)} (--network, --widths, --channels)")
            init_weights = start.state_dict()
        return fit(options, init_weights=init_weights, command=command, replacing=replacing)
    resumed = checkpoint.load(args.checkpoint)
    checkpoint.check_resumable(args.checkpoint, resumed)
    given = {k: v for k, v in vars(args).items() if k not in ("command", "checkpoint")}
    defaults = {k: v for k, v in vars(train_parser.parse_args([])).items() if k != "overwrite"}
    check_training_args({**defaults, **resumed["args"], **given})  # before the checkpoint's checks use them
    options = checkpoint.resume_options(args.checkpoint, resumed, given, defaults)
    return fit(options, resumed, command=command)


if __name__ == "__main__":
    run_cli(main)
