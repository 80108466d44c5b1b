"""Reports on checkpoints: `train.py inspect` (summary, history, training-curve plot) and
`train.py evaluate` (the table of scores per data set, and with --report the HTML page of report_html.py)."""

import json
import math
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

import checkpoint
from data import ImagePairs
from download import default_data_root, fetch_on_first_use
from files import atomic_write, cannot_write, writable_folder
from metrics import evaluate
from onnx_engine import engine_for
from report_html import write_report
from tensorboard_log import write_history
from utils import UserError, choose_device

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EVALUATION_SETS = ("Set5", "Set14", "BSD100")
ZOOM_DB = 0.3  # the PSNR panel that shows late gains spans this far below the best score
ZOOM_EPOCHS = 50  # and is drawn for runs of at least this many epochs (a short one leaves it almost empty)
RUNS_DB = 2.5  # the plot of several runs spans this far below the best score
HISTORY_SHOWN = 5  # epochs `inspect` lists without --history


def summarize(path: str, state: dict) -> dict:
    """What `inspect` shows of the checkpoint `state` read from `path`, as plain data. A bare
    state_dict has no history, arguments or commands."""
    history = state.get("history", [])
    return {
        "path": path,
        "bare": checkpoint.is_bare(state),
        "version": state.get("version"),
        "scale": checkpoint.scale_of(state, path),
        "network": str(checkpoint.shape_of(state, path)),
        "epoch": state.get("epoch"),
        "parameters": sum(p.numel() for p in checkpoint.model_of(state, path, torch.device("cpu")).parameters()),
        "best_psnr": state.get("best_psnr"),
        "last_psnr": history[-1]["psnr"] if history else None,
        "args": state.get("args", {}),
        "commands": state.get("commands", []),
        "position": state.get("position"),
        "history": history,
    }


def print_summary(summary: dict, whole_history: bool = False) -> None:
    if summary["bare"]:
        print(f"{summary['path']}: SRCNN {summary['network']}, {summary['parameters']:,} parameters: a bare "
              f"state_dict (weights only, no scale, arguments or history), taken as x{summary['scale']} unless a "
              "command's --scale says otherwise")
        return
    print(f"{summary['path']}: SRCNN x{summary['scale']}, {summary['network']}, {summary['parameters']:,} parameters, "
          f"epoch {summary['epoch']}, version {summary['version']}")
    if summary["position"]:
        print(f"  interrupted in epoch {summary['epoch'] + 1} after batch {summary['position']['batch']} of "
              f"{summary['position']['batches']}: resume continues from there")
    for key, value in sorted(summary["args"].items()):
        print(f"  {key:14s} {value}")
    for run in summary["commands"]:
        print(f"  from epoch {run['epoch']}: {run['command']}")
        if run.get("step"):  # recorded since the step got its own module (issue 59)
            print(f"    {run['step']}")
    history = summary["history"]
    if not history:
        return
    print(f"best PSNR {summary['best_psnr']:.3f} dB, last PSNR {summary['last_psnr']:.3f} dB, "
          f"{elapsed_minutes(history)[-1]:.1f} minutes of training")
    shown = history if whole_history else history[-HISTORY_SHOWN:]
    if len(shown) < len(history):
        print(f"the last {len(shown)} of {len(history)} epochs (--history shows all, --json everything):")
    print(f"{'epoch':>6} {'loss':>10} {'PSNR':>8} {'SSIM':>7} {'lr':>9} {'time s':>8} {'patches/s':>10}")
    for h in shown:
        print(f"{h['epoch']:6d} {h['loss']:10.6f} {h['psnr']:8.3f} {h['ssim']:7.4f} {h.get('lr', 0):9.2e} "
              f"{h['seconds']:8.1f} {h['patches_per_s']:10.0f}")


def inspect_checkpoints(paths: list[str], as_json: bool = False, plot: str | None = None,
                        filters: str | None = None, whole_history: bool = False,
                        reach: list[float] | None = None, tensorboard: str | None = None) -> int:
    """Print the summaries (text or JSON; with `reach`, the minutes each run took to reach those
    PSNRs); or draw: with `plot` the training curves of one checkpoint, or the PSNR of several
    against training minutes; with `filters` the first layer's filters; or with `tensorboard` write
    each one's history as a TensorBoard run in that folder. These print only where they went."""
    if filters and len(paths) > 1:
        raise UserError("--filters draws the filters of one checkpoint; name one")
    states = [checkpoint.load(path) for path in paths]
    summaries = [summarize(path, state) for path, state in zip(paths, states, strict=True)]
    if tensorboard:
        return write_histories(Path(tensorboard), paths, states)
    if plot and (empty := [s["path"] for s in summaries if not s["history"]]):
        raise UserError(f"{empty[0]} has no training history to plot")
    if filters:
        plot_filters(checkpoint.model_of(states[0], paths[0], torch.device("cpu")).conv1.weight, Path(filters))
        print(f"filters written to {filters}")
    if plot:
        if len(summaries) == 1:
            plot_history(summaries[0], Path(plot))
        else:
            plot_runs(summaries, Path(plot))
        print(f"plot written to {plot}")
    if plot or filters:
        return 0
    if as_json:
        print(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2))
        return 0
    for i, summary in enumerate(summaries):
        print_summary(summary, whole_history)
        if i < len(summaries) - 1:
            print()
    if reach:
        print_minutes_to_reach(summaries, reach)
    return 0


def write_histories(folder: Path, paths: list[str], states: list[dict]) -> int:
    """Each checkpoint's history as a TensorBoard run in `folder`, named by its folder and file
    (runs_x3_last), so that the shipped models and old runs appear beside new ones."""
    names = [f"{Path(path).resolve().parent.name}_{Path(path).stem}" for path in paths]
    for path, name in zip(paths, names, strict=True):
        if names.count(name) > 1:
            raise UserError(f"{path}: two checkpoints would be the run {folder / name}; name them separately")
    writable_folder(folder, "TensorBoard folder")
    for path, name, state in zip(paths, names, states, strict=True):
        epochs = write_history(folder / name, state)
        print(f"{path}: {epochs} epoch(s) written to {folder / name}")
    print(f"see them with: tensorboard --logdir {shlex.quote(str(folder))}")
    return 0


def elapsed_minutes(history: list[dict]) -> list[float]:
    """Minutes of training by the end of each epoch: the epochs' seconds summed (evaluation left out)."""
    return (np.cumsum([record["seconds"] for record in history]) / 60).tolist()


def minutes_to_reach(history: list[dict], psnr: float) -> float | None:
    """Minutes of training until the evaluation PSNR first reached `psnr`."""
    return next((m for m, record in zip(elapsed_minutes(history), history, strict=True) if record["psnr"] >= psnr),
                None)


def print_minutes_to_reach(summaries: list[dict], targets: list[float]) -> None:
    width = max(len(s["path"]) for s in summaries)
    print("\nminutes of training to reach each PSNR (- : not reached), and where the run ended:")
    print(f"{'checkpoint':{width}s}" + "".join(f" {t:7.2f}" for t in targets) + "   final")
    for summary in summaries:
        history = summary["history"]
        reached = [minutes_to_reach(history, target) for target in targets]
        final = f"{history[-1]['psnr']:.3f} after {elapsed_minutes(history)[-1]:.1f}" if history else "-"
        print(f"{summary['path']:{width}s}" + "".join(f" {'-' if m is None else f'{m:.1f}':>7s}" for m in reached)
              + f"   {final}")


def new_figure(width: float, height: float) -> "Figure":
    """A matplotlib figure. matplotlib is imported here, at the first plot, so that training,
    evaluation and a plain `inspect` start without it (about half a second sooner)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(figure: "Figure", path: Path) -> None:
    """Write a figure in the format its suffix names (PNG, SVG, PDF, ...)."""
    with atomic_write(path) as f:
        try:
            figure.savefig(f, format=path.suffix.lstrip(".").lower() or None, dpi=100)
        except ValueError as err:  # a format matplotlib does not write
            raise cannot_write(path, err) from None


def plot_history(summary: dict, path: Path) -> None:
    """Loss and PSNR per epoch, with a dashed line where each recorded resume began; for a run
    long enough to show late gains (ZOOM_EPOCHS), a third panel: the PSNR within ZOOM_DB of the best."""
    from matplotlib.ticker import MaxNLocator

    history = summary["history"]
    epochs = [h["epoch"] for h in history]
    psnrs = [h["psnr"] for h in history]
    best = max(psnrs)
    eval_set = summary["args"].get("eval_set", "evaluation set")
    zoom = len(history) >= ZOOM_EPOCHS
    figure = new_figure(15 if zoom else 10, 4.5)
    panels = figure.subplots(1, 3 if zoom else 2)
    loss_axes, psnr_axes = panels[:2]
    loss_axes.semilogy(epochs, [h["loss"] for h in history], color="tab:blue")
    loss_axes.set(title="training loss (MSE)", xlabel="epoch", ylabel="loss (log scale)")
    psnr_axes.plot(epochs, psnrs, color="tab:green")
    psnr_axes.set(title=f"{eval_set} Y-PSNR", xlabel="epoch", ylabel="dB")
    if zoom:
        panels[2].plot(epochs, psnrs, color="tab:green")
        panels[2].set(title=f"{eval_set} Y-PSNR, the last {ZOOM_DB} dB (best {best:.3f})", xlabel="epoch",
                      ylabel="dB", ylim=(best - ZOOM_DB, best + ZOOM_DB / 15))
        panels[2].axhline(best, color="grey", linewidth=0.8)
    starts = sorted({run["epoch"] for run in summary["commands"] if run["epoch"] > 0})
    for axes in panels:
        axes.grid(True, alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        for epoch in starts:
            axes.axvline(epoch, color="tab:red", linestyle="--", linewidth=0.8,
                         label="resumed" if epoch == starts[0] else None)
    if starts:
        panels[-1].legend(loc="lower right")
    save_figure(figure, path)


def plot_runs(summaries: list[dict], path: Path) -> None:
    """The evaluation PSNR of several runs against their minutes of training (the sum of the
    epochs' seconds, evaluation left out; a log scale, so that both the first minutes and hours
    show), one line each: which recipe gets where, how fast."""
    from matplotlib.ticker import ScalarFormatter

    figure = new_figure(10, 5.5)
    axes = figure.subplots()
    for summary in summaries:
        history = summary["history"]
        minutes = elapsed_minutes(history)
        psnrs = [h["psnr"] for h in history]
        axes.plot(minutes, psnrs, marker="." if len(history) < 40 else None,
                  label=f"{summary['path']}: {psnrs[-1]:.2f} dB after {minutes[-1]:.0f} min")
    best = max(max(h["psnr"] for h in s["history"]) for s in summaries)
    eval_sets = sorted({s["args"].get("eval_set", "evaluation set") for s in summaries})
    axes.set(title=f"{' / '.join(eval_sets)} Y-PSNR against training time", xlabel="training minutes (log scale)",
             ylabel="dB", ylim=(best - RUNS_DB, best + RUNS_DB / 20), xscale="log")
    axes.xaxis.set_major_formatter(ScalarFormatter())  # 1, 10, 100 rather than powers of ten
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    save_figure(figure, path)


def plot_filters(weight: torch.Tensor, path: Path) -> None:
    """The first layer's filters (64 x 3 x 9 x 9) as a grid of colour patches, each stretched to
    its own range, as the SRCNN paper shows them: what the network looks for in its input."""
    weight = weight.detach().float().cpu()
    low = weight.amin(dim=(1, 2, 3), keepdim=True)
    spread = (weight.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-12)
    patches = ((weight - low) / spread).permute(0, 2, 3, 1).numpy()  # N x 9 x 9 x RGB (or Y) in [0, 1]
    if patches.shape[-1] == 1:  # a Y network's filters: gray
        patches = patches.repeat(3, axis=-1)
    columns = math.ceil(math.sqrt(len(patches)))
    rows = math.ceil(len(patches) / columns)
    figure = new_figure(columns * 0.8, rows * 0.8 + 0.4)
    figure.suptitle(f"first-layer filters ({len(patches)} of {weight.shape[2]}x{weight.shape[3]}, "
                    f"{'RGB' if weight.shape[1] == 3 else 'Y'})")
    for i, axes in enumerate(figure.subplots(rows, columns).flat):
        axes.set_axis_off()
        if i < len(patches):
            axes.imshow(patches[i], interpolation="nearest")
    save_figure(figure, path)


def evaluate_checkpoint(path: str, sets: list[str] | None, data_root: str, cuda: bool, self_ensemble: bool,
                        scale: int | None, degradation: str = "pil", report: str | None = None) -> int:
    """Y-PSNR / SSIM of the model and of bicubic on whole data sets, one row per set (and with
    `self_ensemble` a column for the x8 ensemble). Without `sets`: EVALUATION_SETS, in the default
    data root fetched on first use, in another the ones found there. With `report`: also the HTML
    page of report_html.py in that folder."""
    device = choose_device(cuda)
    state = checkpoint.load(path)
    model, scale = checkpoint.model_of(state, path, device), checkpoint.scale_of(state, path, scale)
    network = engine_for(model)  # on the CPU ONNX Runtime when installed: the engine super_resolve.py uses
    root = Path(data_root)
    if root == Path(default_data_root()):  # all three, the known ones fetched there on first use
        sets = sets or list(EVALUATION_SETS)
        fetch_on_first_use(root, [name for name in sets if Path(name).name == name])
    sets = sets or [name for name in EVALUATION_SETS if (root / name).is_dir()] or list(EVALUATION_SETS)
    all_pairs = {name: ImagePairs(root / name, scale, degradation=degradation) for name in sets}  # each found first
    if report:
        writable_folder(Path(report), "report folder")
    print(f"{path}: x{scale}, Y-PSNR (dB) / SSIM, {scale}-pixel border shaved, {degradation} bicubic")
    print(f"{'set':8s} {'images':>6} {'bicubic':>16} {'SRCNN':>16}" + (f" {'SRCNN x8':>16}" if self_ensemble else ""),
          flush=True)
    scores = {}
    keep = report is not None
    for name, pairs in all_pairs.items():
        scores[name] = {"bicubic": evaluate(None, pairs, scale, keep_outputs=keep, progress=f"{name} bicubic"),
                        "srcnn": evaluate(network, pairs, scale, keep_outputs=keep, progress=f"{name} SRCNN")}
        if self_ensemble:
            scores[name]["x8"] = evaluate(network, pairs, scale, self_ensemble=True, keep_outputs=keep,
                                          progress=f"{name} SRCNN x8")
        print(f"{name:8s} {len(pairs):6d}" + "".join(f" {s['psnr']:8.2f} / {s['ssim']:.4f}"
                                                     for s in scores[name].values()), flush=True)
    if report:
        summary = summarize(path, state)
        curve = None
        if summary["history"]:
            plot_history(summary, Path(report) / "training_curve.png")
            curve = "training_curve.png"
        print(f"report written to {write_report(Path(report), summary, degradation, all_pairs, scores, curve)}")
    return 0
