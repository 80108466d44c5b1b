"""Reports on checkpoints: `train.py inspect` (summary, history, training-curve plot) and
`train.py evaluate` (the table of scores per data set, and with --report the HTML page of report_html.py)."""

import json
from pathlib import Path

import torch
from matplotlib.figure import Figure

from data import load_pairs
from inference import evaluate, load_model
from report_html import write_report
from utils import UserError, choose_device, writable_folder

EVALUATION_SETS = ("Set5", "Set14", "BSD100")
ZOOM_DB = 0.3  # the PSNR panel that shows late gains spans this far below the best score


def summarize(path: str) -> dict:
    """What `inspect` shows of a checkpoint, as plain data."""
    _, scale, state = load_model(path, torch.device("cpu"))
    history = state.get("history", [])
    return {
        "path": path,
        "version": state.get("version"),
        "scale": scale,
        "epoch": state.get("epoch"),
        "parameters": sum(v.numel() for v in state.get("model", state).values()),
        "best_psnr": state.get("best_psnr"),
        "last_psnr": history[-1]["psnr"] if history else None,
        "args": state.get("args", {}),
        "commands": state.get("commands", []),
        "position": state.get("position"),
        "history": history,
    }


def print_summary(summary: dict) -> None:
    print(f"{summary['path']}: SRCNN x{summary['scale']}, {summary['parameters']:,} parameters, "
          f"epoch {summary['epoch']}, version {summary['version']}")
    if summary["position"]:
        print(f"  interrupted in epoch {summary['epoch'] + 1} after batch {summary['position']['batch']} of "
              f"{summary['position']['batches']}: resume continues from there")
    for key, value in sorted(summary["args"].items()):
        print(f"  {key:14s} {value}")
    for run in summary["commands"]:
        print(f"  from epoch {run['epoch']}: {run['command']}")
    history = summary["history"]
    if history:
        print(f"best PSNR {summary['best_psnr']:.3f} dB, last PSNR {summary['last_psnr']:.3f} dB")
        print(f"{'epoch':>6} {'loss':>10} {'PSNR':>8} {'SSIM':>7} {'lr':>9} {'time s':>8} {'patches/s':>10}")
        for h in history:
            print(f"{h['epoch']:6d} {h['loss']:10.6f} {h['psnr']:8.3f} {h['ssim']:7.4f} {h.get('lr', 0):9.2e} "
                  f"{h['seconds']:8.1f} {h['patches_per_s']:10.0f}")


def inspect_checkpoint(path: str, as_json: bool, plot: str | None) -> int:
    """Print the summary (text or JSON), or with `plot` draw the training curves and say where."""
    summary = summarize(path)
    if plot:
        if not summary["history"]:
            raise UserError(f"{path} has no training history to plot")
        plot_history(summary, Path(plot))
        print(f"plot written to {plot}")
    elif as_json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 0


def plot_history(summary: dict, path: Path) -> None:
    """Loss, PSNR, and PSNR within ZOOM_DB of the best (where late gains show), per epoch, with
    a dashed line where each recorded resume began."""
    history = summary["history"]
    epochs = [h["epoch"] for h in history]
    psnrs = [h["psnr"] for h in history]
    best = max(psnrs)
    eval_set = summary["args"].get("eval_set", "evaluation set")
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    loss_axes, psnr_axes, zoom_axes = figure.subplots(1, 3)
    loss_axes.semilogy(epochs, [h["loss"] for h in history], color="tab:blue")
    loss_axes.set(title="training loss (MSE)", xlabel="epoch", ylabel="loss (log scale)")
    psnr_axes.plot(epochs, psnrs, color="tab:green")
    psnr_axes.set(title=f"{eval_set} Y-PSNR", xlabel="epoch", ylabel="dB")
    zoom_axes.plot(epochs, psnrs, color="tab:green")
    zoom_axes.set(title=f"{eval_set} Y-PSNR, the last {ZOOM_DB} dB (best {best:.3f})", xlabel="epoch", ylabel="dB",
                  ylim=(best - ZOOM_DB, best + ZOOM_DB / 15))
    zoom_axes.axhline(best, color="grey", linewidth=0.8)
    starts = sorted({run["epoch"] for run in summary["commands"] if run["epoch"] > 0})
    for axes in (loss_axes, psnr_axes, zoom_axes):
        axes.grid(True, alpha=0.3)
        for epoch in starts:
            axes.axvline(epoch, color="tab:red", linestyle="--", linewidth=0.8,
                         label="resumed" if epoch == starts[0] else None)
    if starts:
        zoom_axes.legend(loc="lower right")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot write {path}: {getattr(err, 'strerror', None) or err}") from None


def evaluate_checkpoint(path: str, sets: list[str] | None, data_root: str, cuda: bool, self_ensemble: bool,
                        scale: int | None, degradation: str = "pil", report: str | None = None) -> int:
    """Y-PSNR / SSIM of the model and of bicubic on whole data sets, one row per set (and with
    `self_ensemble` a column for the x8 ensemble). Without `sets`: every one of EVALUATION_SETS found
    in the data root. With `report`: also the HTML page of report_html.py in that folder."""
    device = choose_device(cuda)
    model, scale, _ = load_model(path, device, scale)
    root = Path(data_root)
    sets = sets or [name for name in EVALUATION_SETS if (root / name).is_dir()] or list(EVALUATION_SETS)
    all_pairs = {name: load_pairs(root / name, scale, degradation=degradation) for name in sets}  # all, before output
    if report:
        writable_folder(Path(report), "report folder")
    print(f"{path}: x{scale}, Y-PSNR (dB) / SSIM, {scale}-pixel border shaved, {degradation} bicubic")
    print(f"{'set':8s} {'images':>6} {'bicubic':>16} {'SRCNN':>16}" + (f" {'SRCNN x8':>16}" if self_ensemble else ""))
    scores = {}
    for name, pairs in all_pairs.items():
        keep = report is not None
        scores[name] = {"bicubic": evaluate(None, pairs, scale, keep_outputs=keep),
                        "srcnn": evaluate(model, pairs, scale, keep_outputs=keep)}
        if self_ensemble:
            scores[name]["x8"] = evaluate(model, pairs, scale, self_ensemble=True, keep_outputs=keep)
        print(f"{name:8s} {len(pairs):6d}" + "".join(f" {s['psnr']:8.2f} / {s['ssim']:.4f}"
                                                     for s in scores[name].values()))
    if report:
        summary = summarize(path)
        curve = None
        if summary["history"]:
            plot_history(summary, Path(report) / "training_curve.png")
            curve = "training_curve.png"
        print(f"report written to {write_report(Path(report), summary, degradation, all_pairs, scores, curve)}")
    return 0
