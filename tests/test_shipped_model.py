"""The shipped models (checkpoint.pth at x3, models/srcnn_x2.pth, models/srcnn_x4.pth): trained on T91
alone, their recipes on record, Set5 and Set14 at the project's goals under Pillow's bicubic (and for x3
MATLAB's); without --checkpoint, --scale picks them."""

import numpy as np
import pytest
import torch
from PIL import Image

from data import load_pairs
from inference import SHIPPED, evaluate, load_model
from utils import load_checkpoint

GOALS = {2: (36.34, 32.18), 3: (32.50, 29.10), 4: (30.09, 27.20)}  # Set5, Set14; x2, x4: the paper's 9-1-5 on T91


@pytest.mark.parametrize("scale", sorted(SHIPPED))
def test_shipped_checkpoint_records_how_it_was_made(scale):
    checkpoint = load_checkpoint(SHIPPED[scale])
    assert checkpoint["scale"] == scale and checkpoint["args"]["train_set"] == "T91"
    assert checkpoint["position"] is None, "a mid-epoch (interrupted) checkpoint was shipped"
    assert [h["epoch"] for h in checkpoint["history"]] == list(range(1, checkpoint["epoch"] + 1))
    assert checkpoint["optimizer"]["state"], "no optimizer state: resume could not continue it"
    first, *resumed = checkpoint["commands"]  # one command: a resume may continue it but change nothing
    assert first["epoch"] == 0 and first["command"].startswith("python train.py train ")
    if scale == 3:  # from scratch; x2 and x4 start from its weights
        assert "--init" not in first["command"]
    else:
        assert f"--scale {scale}" in first["command"] and "--init checkpoint.pth" in first["command"]
    assert all(c["command"].split()[:3] == ["python", "train.py", "resume"] and len(c["command"].split()) == 4
               for c in resumed)
    assert [c["epoch"] for c in checkpoint["commands"]] == sorted(c["epoch"] for c in checkpoint["commands"])


@pytest.mark.parametrize("scale", sorted(SHIPPED))
def test_shipped_checkpoint_scores_what_its_history_says_and_meets_the_goals(real_data, scale):
    model, saved_scale, checkpoint = load_model(SHIPPED[scale], torch.device("cpu"))
    assert saved_scale == scale
    set5 = evaluate(model, load_pairs(real_data / "Set5", scale), scale)["psnr"]
    assert abs(set5 - checkpoint["history"][-1]["psnr"]) < 1e-3
    assert set5 >= GOALS[scale][0]
    assert evaluate(model, load_pairs(real_data / "Set14", scale), scale)["psnr"] >= GOALS[scale][1]


def test_shipped_checkpoint_holds_under_the_matlab_protocol(real_data):
    model, scale, _ = load_model(SHIPPED[3], torch.device("cpu"))
    assert evaluate(model, load_pairs(real_data / "Set5", scale, degradation="matlab"), scale)["psnr"] >= 32.50
    assert evaluate(model, load_pairs(real_data / "Set14", scale, degradation="matlab"), scale)["psnr"] >= 29.09


def test_scale_without_a_checkpoint_picks_the_shipped_model(cli, tmp_path, mini_root):
    lr = tmp_path / "lr.png"
    Image.effect_noise((30, 20), 60).convert("RGB").save(lr)
    for scale, path in SHIPPED.items():
        picked, named = tmp_path / f"picked{scale}.png", tmp_path / f"named{scale}.png"
        assert cli("super_resolve", "--scale", str(scale), str(lr), "--output", str(picked)).returncode == 0
        assert cli("super_resolve", "--checkpoint", str(path), str(lr), "--output", str(named)).returncode == 0
        assert Image.open(picked).size == (30 * scale, 20 * scale)
        assert np.array_equal(np.asarray(Image.open(picked)), np.asarray(Image.open(named)))
    assert cli("super_resolve", str(lr), "--output", str(tmp_path / "plain.png")).returncode == 0  # no --scale: x3
    plain, named = (np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("plain", "named3"))
    assert np.array_equal(plain, named)
    refused = cli("super_resolve", "--scale", "5", str(lr))
    assert refused.returncode == 2 and "no model is shipped for x5" in refused.stderr
    evaluated = cli("train", "evaluate", "--scale", "2", "--data-root", str(mini_root), "--sets", "Set5")
    assert evaluated.returncode == 0 and f"{SHIPPED[2]}: x2" in evaluated.stdout
