"""docs/side_by_side.py: another code's run, a bare state dict an epoch, scored by this project's
protocol and timed by its files."""

import importlib.util
import os
from pathlib import Path

import torch

from data import ImagePairs
from metrics import evaluate
from model import SRCNN, Shape
from onnx_engine import engine_for

SCRIPT = Path(__file__).parents[1] / "docs" / "side_by_side.py"


def side_by_side():
    spec = importlib.util.spec_from_file_location("side_by_side", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_epoch_file_is_scored_as_ours_in_epoch_order_with_the_minutes_its_file_says(mini_root, tmp_path):
    shape, started = Shape((9, 5, 5), (12, 6), 1), 1_000_000.0  # the ports' 9-5-5 on Y, narrower
    models = {}
    for epoch, saved in ((2, 30.0), (10, 90.0)):  # "epoch_10" sorts before "epoch_2" as text
        torch.manual_seed(epoch)
        models[epoch] = SRCNN(shape)
        path = tmp_path / f"epoch_{epoch}.pth"
        torch.save(models[epoch].state_dict(), path)  # bare, as the port saves them
        os.utime(path, (started + saved, started + saved))
    summary = side_by_side().port_summary(tmp_path, started, mini_root / "Set5", 3)
    pairs = ImagePairs(mini_root / "Set5", 3)
    assert [(r["epoch"], r["seconds"]) for r in summary["history"]] == [(1, 30.0), (2, 60.0)]
    assert [r["psnr"] for r in summary["history"]] == [evaluate(engine_for(models[e].eval()), pairs, 3)["psnr"]
                                                       for e in (2, 10)]
    assert summary["args"]["eval_set"] == "Set5"
