"""The shipped models (9-1-5: checkpoint.pth at x3, models/srcnn_x2.pth, models/srcnn_x4.pth; 9-5-5 on Y:
models/srcnn_955_x2.pth, _x3.pth, _x4.pth): trained on T91 alone, their recipes on record, Set5 and
Set14 at the project's goals under Pillow's bicubic (and for x3 MATLAB's); without --checkpoint, --model and
--scale pick them."""

import shlex

import numpy as np
import pytest
import torch
from PIL import Image

import train
from checkpoint import SHIPPED, SHIPPED_MODELS, check_resumable, load_model, training_sets
from checkpoint import load as load_checkpoint
from conftest import ROOT
from data import load_pairs
from metrics import evaluate

# Set5, Set14: x2, x4 the paper's 9-1-5 on T91; the 9-5-5 Y the paper's 9-5-5 trained on ImageNet
GOALS = {("915", 2): (36.34, 32.18), ("915", 3): (32.50, 29.10), ("915", 4): (30.09, 27.20),
         ("955", 2): (36.66, 32.42), ("955", 3): (32.75, 29.30),
         ("955", 4): (30.48, 27.49)}



WHERE_IT_RAN = ("cuda", "data_root", "checkpoint_dir", "pass_patches")  # where it ran, not what it trained


def training_args(argv: list[str]) -> dict:
    """The training arguments a `train.py train ...` command line means, @FILEs expanded as train.py does."""
    args = vars(train.build_parser()[0].parse_args(argv))
    return {k: v for k, v in args.items() if k not in ("command", *WHERE_IT_RAN)}


@pytest.mark.parametrize("shipped", sorted(SHIPPED))
def test_shipped_checkpoint_is_what_its_recipe_file_trains(shipped, monkeypatch):
    monkeypatch.chdir(ROOT)
    network, scale = shipped
    checkpoint = load_checkpoint(SHIPPED[shipped])
    recipe = training_args(["train", f"@recipes/{SHIPPED_MODELS[shipped].recipe}"])
    assert recipe["scale"] == scale and checkpoint["scale"] == scale
    assert recipe["network"].replace("-", "") == network
    defaults = training_args(["train"])  # options newer than a checkpoint mean their defaults, as for resume
    recorded = {**defaults, **checkpoint["args"], "train_set": training_sets(checkpoint["args"])}
    assert {k: v for k, v in recorded.items() if k not in WHERE_IT_RAN} == recipe
    first, *resumed = checkpoint["commands"]  # one command: a resume may continue it but change nothing
    assert first["epoch"] == 0 and training_args(shlex.split(first["command"])[2:]) == recipe
    assert all(shlex.split(c["command"])[2] == "resume" and len(shlex.split(c["command"])) == 4 for c in resumed)
    assert [c["epoch"] for c in checkpoint["commands"]] == sorted(c["epoch"] for c in checkpoint["commands"])


@pytest.mark.parametrize("shipped", sorted(SHIPPED))
def test_shipped_checkpoint_can_be_resumed_and_its_history_is_whole(shipped):
    checkpoint = load_checkpoint(SHIPPED[shipped])
    check_resumable(SHIPPED[shipped], checkpoint)
    assert training_sets(checkpoint["args"]) == ["T91"]
    assert checkpoint["position"] is None, "a mid-epoch (interrupted) checkpoint was shipped"
    assert [h["epoch"] for h in checkpoint["history"]] == list(range(1, checkpoint["epoch"] + 1))
    assert checkpoint["optimizer"]["state"], "no optimizer state: resume could not continue it"


@pytest.mark.slow
@pytest.mark.parametrize("shipped", sorted(SHIPPED))
def test_shipped_checkpoint_scores_what_its_history_says_and_meets_the_goals(real_data, shipped):
    model, scale, checkpoint = load_model(SHIPPED[shipped], torch.device("cpu"))
    assert (model.shape.name.replace("-", ""), scale) == shipped
    set5 = evaluate(model, load_pairs(real_data / "Set5", scale), scale)["psnr"]
    assert abs(set5 - checkpoint["history"][-1]["psnr"]) < 1e-3
    assert set5 >= GOALS[shipped][0]
    set14 = evaluate(model, load_pairs(real_data / "Set14", scale), scale)["psnr"]
    assert set14 >= GOALS[shipped][1]
    assert [round(set5, 2), round(set14, 2)] == list(SHIPPED_MODELS[shipped].scores[:2])  # as the one list says


@pytest.mark.slow
def test_shipped_checkpoint_holds_under_the_matlab_protocol(real_data):
    model, scale, _ = load_model(SHIPPED["915", 3], torch.device("cpu"))
    assert evaluate(model, load_pairs(real_data / "Set5", scale, degradation="matlab"), scale)["psnr"] >= 32.50
    assert evaluate(model, load_pairs(real_data / "Set14", scale, degradation="matlab"), scale)["psnr"] >= 29.09


def test_model_and_scale_without_a_checkpoint_pick_the_shipped_model(cli, tmp_path, mini_root):
    lr = tmp_path / "lr.png"
    Image.effect_noise((30, 20), 60).convert("RGB").save(lr)
    for (network, scale), path in SHIPPED.items():
        picked, named = tmp_path / f"picked{network}{scale}.png", tmp_path / f"named{network}{scale}.png"
        assert cli("super_resolve", "--model", network, "--scale", str(scale), str(lr),
                   "--output", str(picked)).returncode == 0
        assert cli("super_resolve", "--checkpoint", str(path), str(lr), "--output", str(named)).returncode == 0
        assert Image.open(picked).size == (30 * scale, 20 * scale)
        assert np.array_equal(np.asarray(Image.open(picked)), np.asarray(Image.open(named)))
    assert cli("super_resolve", str(lr), "--output", str(tmp_path / "plain.png")).returncode == 0  # no --scale: x3
    plain, named = (np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("plain", "named9153"))
    assert np.array_equal(plain, named)
    assert not np.array_equal(named, np.asarray(Image.open(tmp_path / "named9553.png")))
    refused = cli("super_resolve", "--scale", "5", str(lr))
    assert refused.returncode == 2 and "no 915 model is shipped for x5 (only x2, x3, x4)" in refused.stderr
    refused = cli("super_resolve", "--model", "955", "--scale", "5", str(lr))
    assert refused.returncode == 2 and "no 955 model is shipped for x5 (only x2, x3, x4)" in refused.stderr
    refused = cli("super_resolve", "--model", "955", "--checkpoint", str(SHIPPED["915", 3]), str(lr))
    assert refused.returncode == 2 and "--model picks a shipped model" in refused.stderr
    evaluated = cli("train", "evaluate", "--scale", "2", "--data-root", str(mini_root), "--sets", "Set5")
    assert evaluated.returncode == 0 and f"{SHIPPED['915', 2]}: x2" in evaluated.stdout
    evaluated = cli("train", "evaluate", "--model", "955", "--data-root", str(mini_root), "--sets", "Set5")
    assert evaluated.returncode == 0 and f"{SHIPPED['955', 3]}: x3" in evaluated.stdout


def test_one_list_of_shipped_models_that_the_files_recipes_and_readme_agree_with():
    """Issue 72: the shipped models had been listed in several places that drifted (docs/code.md named
    three of six, and a recipe of a model no longer shipped stayed). Every model file has its entry in
    checkpoint.SHIPPED_MODELS, with a recipe in recipes/ and a row of the README's results table with its
    scores; every recipe in recipes/ is a shipped model's or a speedrun's (docs/training.md)."""
    files = {ROOT / "checkpoint.pth", *(ROOT / "models").glob("*.pth")}
    assert files == {model.path for model in SHIPPED_MODELS.values()}
    readme = (ROOT / "README.md").read_text().splitlines()
    for model in SHIPPED_MODELS.values():
        assert (ROOT / "recipes" / model.recipe).is_file(), model.recipe
        name = model.path.relative_to(ROOT).as_posix()
        rows = [line for line in readme if line.startswith("| ") and f"`{name}`" in line
                and all(f"| {score:.2f} |" in line for score in model.scores)]
        assert rows, f"README: no results row for {name} with {model.scores}"
        assert any(f"@recipes/{model.recipe}" in line for line in readme), f"README: no command for {model.recipe}"
    training = (ROOT / "docs" / "training.md").read_text()
    for recipe in (ROOT / "recipes").iterdir():
        shipped = recipe.name in {model.recipe for model in SHIPPED_MODELS.values()}
        assert shipped or recipe.name.startswith("speedrun_") and f"@recipes/{recipe.name}" in training, recipe.name
