"""The shipped checkpoint.pth: trained on T91 alone, its recipe on record, Set5 and Set14 at the project's
goals under Pillow's bicubic and MATLAB's."""

import torch

from conftest import ROOT
from data import load_pairs
from inference import evaluate, load_model
from utils import load_checkpoint

SHIPPED = ROOT / "checkpoint.pth"


def test_shipped_checkpoint_records_how_it_was_made():
    checkpoint = load_checkpoint(SHIPPED)
    assert checkpoint["args"]["train_set"] == "T91"
    assert checkpoint["position"] is None, "a mid-epoch (interrupted) checkpoint was shipped"
    assert [h["epoch"] for h in checkpoint["history"]] == list(range(1, checkpoint["epoch"] + 1))
    assert checkpoint["optimizer"]["state"], "no optimizer state: resume could not continue it"
    assert [c["epoch"] for c in checkpoint["commands"]] == sorted(c["epoch"] for c in checkpoint["commands"])


def test_shipped_checkpoint_scores_what_its_history_says_and_meets_the_goals(real_data):
    model, scale, checkpoint = load_model(SHIPPED, torch.device("cpu"))
    assert scale == 3
    set5 = evaluate(model, load_pairs(real_data / "Set5", scale), scale)["psnr"]
    assert abs(set5 - checkpoint["history"][-1]["psnr"]) < 1e-3
    assert set5 >= 32.50
    assert evaluate(model, load_pairs(real_data / "Set14", scale), scale)["psnr"] >= 29.10


def test_shipped_checkpoint_holds_under_the_matlab_protocol(real_data):
    model, scale, _ = load_model(SHIPPED, torch.device("cpu"))
    assert evaluate(model, load_pairs(real_data / "Set5", scale, degradation="matlab"), scale)["psnr"] >= 32.50
    assert evaluate(model, load_pairs(real_data / "Set14", scale, degradation="matlab"), scale)["psnr"] >= 29.09
