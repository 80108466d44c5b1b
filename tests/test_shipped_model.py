"""The shipped models (checkpoint.pth at x3, models/srcnn_x2.pth, models/srcnn_x4.pth): trained on T91
alone, their recipes on record, Set5 and Set14 at the project's goals under Pillow's bicubic (and for x3
MATLAB's); without --checkpoint, --scale picks them."""

import shlex

import numpy as np
import pytest
import torch
from PIL import Image

import train
from checkpoint import SHIPPED, check_resumable, load_model, training_sets
from checkpoint import load as load_checkpoint
from conftest import ROOT
from data import load_pairs
from metrics import evaluate

GOALS = {2: (36.34, 32.18), 3: (32.50, 29.10), 4: (30.09, 27.20)}  # Set5, Set14; x2, x4: the paper's 9-1-5 on T91


WHERE_IT_RAN = ("cuda", "data_root", "checkpoint_dir")  # the device and folders of the run, not what it trained


def training_args(argv: list[str]) -> dict:
    """The training arguments a `train.py train ...` command line means, @FILEs expanded as train.py does."""
    args = vars(train.build_parser()[0].parse_args(argv))
    return {k: v for k, v in args.items() if k not in ("command", *WHERE_IT_RAN)}


@pytest.mark.parametrize("scale", sorted(SHIPPED))
def test_shipped_checkpoint_is_what_its_recipe_file_trains(scale, monkeypatch):
    monkeypatch.chdir(ROOT)
    checkpoint = load_checkpoint(SHIPPED[scale])
    recipe = training_args(["train", f"@recipes/x{scale}.args"])
    assert recipe["scale"] == scale and checkpoint["scale"] == scale
    defaults = training_args(["train"])  # options newer than a checkpoint mean their defaults, as for resume
    recorded = {**defaults, **checkpoint["args"], "train_set": training_sets(checkpoint["args"])}
    assert {k: v for k, v in recorded.items() if k not in WHERE_IT_RAN} == recipe
    first, *resumed = checkpoint["commands"]  # one command: a resume may continue it but change nothing
    assert first["epoch"] == 0 and training_args(shlex.split(first["command"])[2:]) == recipe
    assert all(shlex.split(c["command"])[2] == "resume" and len(shlex.split(c["command"])) == 4 for c in resumed)
    assert [c["epoch"] for c in checkpoint["commands"]] == sorted(c["epoch"] for c in checkpoint["commands"])


@pytest.mark.parametrize("scale", sorted(SHIPPED))
def test_shipped_checkpoint_can_be_resumed_and_its_history_is_whole(scale):
    checkpoint = load_checkpoint(SHIPPED[scale])
    check_resumable(SHIPPED[scale], checkpoint)
    assert training_sets(checkpoint["args"]) == ["T91"]
    assert checkpoint["position"] is None, "a mid-epoch (interrupted) checkpoint was shipped"
    assert [h["epoch"] for h in checkpoint["history"]] == list(range(1, checkpoint["epoch"] + 1))
    assert checkpoint["optimizer"]["state"], "no optimizer state: resume could not continue it"


@pytest.mark.slow
@pytest.mark.parametrize("scale", sorted(SHIPPED))
def test_shipped_checkpoint_scores_what_its_history_says_and_meets_the_goals(real_data, scale):
    model, saved_scale, checkpoint = load_model(SHIPPED[scale], torch.device("cpu"))
    assert saved_scale == scale
    set5 = evaluate(model, load_pairs(real_data / "Set5", scale), scale)["psnr"]
    assert abs(set5 - checkpoint["history"][-1]["psnr"]) < 1e-3
    assert set5 >= GOALS[scale][0]
    assert evaluate(model, load_pairs(real_data / "Set14", scale), scale)["psnr"] >= GOALS[scale][1]


@pytest.mark.slow
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
