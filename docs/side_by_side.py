"""Our recipe's runs beside an unmodified run of another SRCNN code (yjn870/SRCNN-pytorch): Set5
Y-PSNR against minutes of training in one figure, and the minutes each run took to reach some scores.

    python docs/side_by_side.py runs/study_915/last.pth runs/study_935/last.pth \\
        runs/study_955/last.pth runs/study_955y/last.pth --port PORT/out/x3 --port-start STAMP \\
        --reach 31.50 32.00 32.39 --plot docs/network_study.png

Our runs are checkpoints: their histories give the curves (`train.py inspect --plot` draws the same).
The port saves a bare state dict a epoch (epoch_0.pth, epoch_1.pth, ...): each is scored here with
the code of `train.py evaluate` (Pillow bicubic, Y channel, border shaved), so both codes are judged
alike. Its minutes are the files' times since the run began (STAMP: a file holding the start time
in seconds, e.g. written by `date +%s.%N` just before the port's command), so they include its own
per-epoch Set5 pass, which ours leave out: a second or two an epoch on a CPU.
"""

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoint  # noqa: E402
from data import ImagePairs  # noqa: E402
from download import default_data_root  # noqa: E402
from metrics import evaluate  # noqa: E402
from onnx_engine import engine_for  # noqa: E402
from report import elapsed_minutes, plot_runs, print_minutes_to_reach, summarize  # noqa: E402

PORT_NAME = "yjn870/SRCNN-pytorch, unmodified"


def port_summary(outputs: Path, started: float, eval_set: Path, scale: int) -> dict:
    """The port's run as report.py's summaries are: a history of each epoch's score and seconds."""
    files = sorted(outputs.glob("epoch_*.pth"), key=lambda p: int(re.findall(r"\d+", p.stem)[0]))
    if not files:
        raise SystemExit(f"error: no epoch_N.pth in {outputs}")
    pairs = ImagePairs(eval_set, scale)
    history, before = [], started
    for i, path in enumerate(files, 1):
        model = checkpoint.model_of(checkpoint.load(path), path, torch.device("cpu"))
        saved = path.stat().st_mtime
        history.append({"epoch": i, "psnr": evaluate(engine_for(model), pairs, scale)["psnr"],
                        "seconds": saved - before})
        before = saved
    return {"path": PORT_NAME, "history": history, "args": {"eval_set": eval_set.name}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="our runs' checkpoints (their last.pth)")
    parser.add_argument("--port", type=Path, required=True, help="the port's folder of epoch_N.pth")
    parser.add_argument("--port-start", type=Path, required=True, help="a file holding the port's start time")
    parser.add_argument("--data-root", default=default_data_root())
    parser.add_argument("--scale", type=int, default=3)
    parser.add_argument("--reach", type=float, nargs="+", default=[31.50, 32.00, 32.39])
    parser.add_argument("--plot", help="where the figure goes")
    args = parser.parse_args()
    ours = [summarize(path, checkpoint.load(path)) for path in args.checkpoints]
    port = port_summary(args.port, float(args.port_start.read_text()), Path(args.data_root) / "Set5", args.scale)
    for record, minutes in zip(port["history"], elapsed_minutes(port["history"]), strict=True):
        print(f"{PORT_NAME}: epoch {record['epoch']:3d}  Set5 {record['psnr']:.3f} dB after {minutes:.1f} minutes")
    print_minutes_to_reach(ours + [port], args.reach)
    if args.plot:
        plot_runs(ours + [port], Path(args.plot))
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
