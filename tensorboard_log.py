"""What a run shows in TensorBoard, as BasicSR, KAIR and mmagic log to it: `train --tensorboard`
while it trains, `inspect --tensorboard` for any checkpoint's recorded history. Every figure is on
the axis of optimizer steps: the training loss, learning rate and patches a second where the loop
already reads the loss (train.CHECK_EVERY), and per epoch the evaluation's Y-PSNR and SSIM with the
epoch and the minutes of training beside them; a crop of an evaluation image as bicubic | SRCNN |
ground truth; the command line, the expanded arguments and the step as text; the final figures as
hparams (TensorBoard's HParams tab compares runs by them). Written by process 0 alone."""

import json
import math
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from inference import Network, enhance

CROP = 128  # the side, in output pixels, of the evaluation image's crop shown each epoch


def folder_of(args: dict) -> Path | None:
    """Where a run's events go: --tensorboard's folder, recorded as given or (--tensorboard alone) as
    the `tensorboard` folder in --checkpoint-dir; None without the flag."""
    chosen = args.get("tensorboard")
    return None if chosen is None else Path(chosen or Path(args["checkpoint_dir"]) / "tensorboard")


def open_board(args: dict, step: int, command: str | None, how: str, main: bool) -> "RunBoard | None":
    """A training run's board (--tensorboard) from its `step` on, in process 0 (`main`) alone, with the
    command line, arguments and step (`how`) as text; its folder recorded in `args`, so that a resumed
    run writes on into it. None without the flag, and in the other processes."""
    folder = folder_of(args)
    if folder is None:
        return None
    args["tensorboard"] = str(folder)
    if not main:
        return None
    board = RunBoard(folder, step)
    board.texts(step, command, args, how)
    return board


class RunBoard:
    """The event files of one run in `folder`. `step`: the optimizer steps the run has taken; a
    resumed run's board drops every event past it (TensorBoard's purge; a new run's, every event), so
    the curves show what the checkpoint holds and no step twice."""

    def __init__(self, folder: Path, step: int, walltime: float | None = None) -> None:
        self.writer = SummaryWriter(str(folder), purge_step=step + 1 if step else 0)
        self.walltime = walltime  # None: now; a number: the run's own clock (inspect writes a history)

    def texts(self, step: int, command: str | None, args: dict, how: str | None) -> None:
        """The command line, the expanded arguments and the training step, in words."""
        if command:
            self.writer.add_text("run/command", f"`{command}`", step, self.walltime)
        self.writer.add_text("run/arguments", "\n".join(f"    {k}: {json.dumps(v)}" for k, v in sorted(args.items())),
                             step, self.walltime)
        if how:
            self.writer.add_text("run/step", how, step, self.walltime)

    def training(self, step: int, loss: float, lr: float, patches_per_s: float) -> None:
        for tag, value in (("train/loss", loss), ("train/lr", lr), ("train/patches_per_s", patches_per_s)):
            self.writer.add_scalar(tag, value, step, self.walltime)

    def evaluation(self, step: int, eval_set: str, record: dict, minutes: float) -> None:
        """An epoch's evaluation (its history record), the epoch and the minutes of training so far."""
        scalars = {f"{eval_set}/psnr": record["psnr"], f"{eval_set}/ssim": record["ssim"],
                   "progress/epoch": record["epoch"], "progress/minutes": minutes}
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step, self.walltime)

    def picture(self, step: int, tag: str, network: Network, lr_up: torch.Tensor, hr: torch.Tensor) -> None:
        """A centre crop of one evaluation image: bicubic | SRCNN | ground truth, side by side."""
        _, height, width = hr.shape
        top, left = max(0, (height - CROP) // 2), max(0, (width - CROP) // 2)
        crop = (..., slice(top, top + CROP), slice(left, left + CROP))
        panels = [lr_up[crop], enhance(network, lr_up)[crop], hr[crop]]
        self.writer.add_image(f"{tag}: bicubic | SRCNN | ground truth", torch.cat(panels, dim=-1), step,
                              self.walltime)

    def epoch(self, step: int, args: dict, history: list[dict], network: Network, pairs) -> None:
        """A training epoch's evaluation (its record, the last of `history`), and every --tensorboard-images
        epochs the first evaluation image's crop (of `pairs`) as `network` now upscales it; flushed."""
        record = history[-1]
        self.evaluation(step, args["eval_set"], record, sum(h["seconds"] for h in history) / 60)
        if args["tensorboard_images"] and record["epoch"] % args["tensorboard_images"] == 0:
            name, lr_up, hr = next(iter(pairs))
            self.picture(step, f"{args['eval_set']}/{name}", network, lr_up, hr)
        self.writer.flush()

    def finish(self, step: int, args: dict, best_psnr: float, last_psnr: float) -> None:
        self.final(step, args, {"best_psnr": best_psnr, "last_psnr": last_psnr})
        self.close()

    def final(self, step: int, args: dict, figures: dict) -> None:
        """The run's arguments as hparams and its final figures as their metrics (HParams tab)."""
        values = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in sorted(args.items())}
        for summary in hparams(values, {f"hparams/{k}": v for k, v in figures.items()}):
            self.writer.file_writer.add_summary(summary, step, self.walltime)
        for name, value in figures.items():
            self.writer.add_scalar(f"hparams/{name}", value, step, self.walltime)

    def close(self) -> None:
        self.writer.close()


def write_history(folder: Path, state: dict) -> int:
    """A checkpoint's recorded history as a run in `folder` (inspect --tensorboard): each epoch's
    figures at the optimizer steps it ended at (from its patches and the batch size), on the clock of
    its minutes of training; each command line where it started. Returns the epochs written."""
    history, args = state.get("history", []), state.get("args", {})
    batch = max(1, args.get("batch_size", 1))
    ends, step, seconds = [], 0, 0.0
    for record in history:
        step += math.ceil(round(record["patches_per_s"] * record["seconds"]) / batch)
        seconds += record["seconds"]
        ends.append((step, seconds))
    board = RunBoard(folder, 0, walltime=0.0)
    for run in state.get("commands") or [{"epoch": 0}]:
        start = ends[run["epoch"] - 1][0] if 0 < run["epoch"] <= len(ends) else 0
        board.texts(start, run.get("command"), args, run.get("step"))
    eval_set = args.get("eval_set", "Set5")
    for record, (step, seconds) in zip(history, ends, strict=True):
        board.walltime = seconds
        board.training(step, record["loss"], record.get("lr", math.nan), record["patches_per_s"])  # the epoch's
        board.evaluation(step, eval_set, record, seconds / 60)
    if history:
        figures = {"best_psnr": state.get("best_psnr", math.nan), "last_psnr": history[-1]["psnr"]}
        board.final(ends[-1][0], args, figures)
    board.close()
    return len(history)
