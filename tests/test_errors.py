"""Errors a user can cause: one clear line on stderr, non-zero exit, no traceback, nothing lost."""

import math
import os
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import ROOT, assert_clean_error, run
from model import SRCNN, Shape


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "bare.pth"
    torch.save(SRCNN().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def lr_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "lr.png"
    Image.new("RGB", (12, 10), (200, 30, 90)).save(path)
    return path


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bare_state_dict_is_accepted(cli, weights, lr_image, tmp_path):
    result = cli("super_resolve", "--checkpoint", str(weights), str(lr_image), "--output", str(tmp_path / "o.png"))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "o.png").size == (36, 30)


def test_missing_and_non_image_inputs(cli, weights, tmp_path):
    assert_clean_error(cli("super_resolve", "--checkpoint", str(weights), str(tmp_path / "nope.png")), "not found")
    text = tmp_path / "text.png"
    text.write_text("hello, not an image")
    assert_clean_error(cli("super_resolve", "--checkpoint", str(weights), str(text)), "text.png")


def test_truncated_and_random_checkpoints(cli, weights, lr_image, tmp_path):
    data = weights.read_bytes()
    for name, content in (("half.pth", data[: len(data) // 2]), ("random.pth", os.urandom(5000)), ("empty.pth", b"")):
        (tmp_path / name).write_bytes(content)
        result = cli("super_resolve", "--checkpoint", str(tmp_path / name), str(lr_image))
        assert_clean_error(result, name)


def test_checkpoint_of_something_else_names_missing_keys(cli, lr_image, tmp_path):
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    result = cli("super_resolve", "--checkpoint", str(tmp_path / "other.pth"), str(lr_image))
    assert_clean_error(result, "missing keys", "conv1.weight")
    assert_clean_error(cli("train", "resume", str(tmp_path / "other.pth")), "missing keys")


def test_wrong_shapes_are_refused(cli, lr_image, tmp_path):
    state = SRCNN().state_dict()
    state["conv1.weight"] = torch.zeros(64, 1, 9, 9)
    torch.save(state, tmp_path / "shape.pth")
    assert_clean_error(cli("super_resolve", "--checkpoint", str(tmp_path / "shape.pth"), str(lr_image)), "shape")


def test_code_running_pickle_is_refused_and_nothing_runs(cli, lr_image, tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": RunsCode(marker)}, f)
    torch.save({"model": RunsCode(marker)}, tmp_path / "evil_zip.pth")
    for name in ("evil.pth", "evil_zip.pth"):
        assert_clean_error(cli("super_resolve", "--checkpoint", str(tmp_path / name), str(lr_image)), name)
        assert_clean_error(cli("train", "inspect", str(tmp_path / name)), name)
    result = run("train.py", "resume", str(tmp_path / "evil_zip.pth"))  # the real CLI, in its own process
    assert_clean_error(result, "refused", "can run code")
    assert not marker.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_cuda_without_cuda(cli, weights, lr_image, mini_root, tmp_path):
    assert_clean_error(cli("super_resolve", "--cuda", "--checkpoint", str(weights), str(lr_image)), "cuda")
    result = cli("train", "train", "--cuda", "--data-root", str(mini_root), "--checkpoint-dir", str(tmp_path))
    assert_clean_error(result, "cuda")


def test_missing_or_empty_data_folder_prints_the_fix(cli, tmp_path):
    result = cli("train", "train", "--data-root", str(tmp_path), "--checkpoint-dir", str(tmp_path / "c"))
    assert_clean_error(result, "T91", "python data.py download")
    (tmp_path / "T91").mkdir()
    result = cli("train", "train", "--data-root", str(tmp_path), "--checkpoint-dir", str(tmp_path / "c"))
    assert_clean_error(result, "no images")


def test_evaluate_checks_every_set_before_printing_anything(cli, weights, mini_root):
    result = cli("train", "evaluate", str(weights), "--data-root", str(mini_root), "--sets", "Set5", "Set14")
    assert_clean_error(result, "Set14")
    assert result.stdout == ""


def test_evaluate_refuses_a_report_folder_it_cannot_write_before_any_work(cli, weights, mini_root, tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    result = cli("train", "evaluate", str(weights), "--data-root", str(mini_root), "--sets", "Set5",
                 "--report", str(tmp_path / "taken" / "report"))
    assert_clean_error(result, "report folder")
    assert result.stdout == ""


def test_training_images_smaller_than_patch(cli, tmp_path, mini_root):
    (tmp_path / "T91").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "T91" / "tiny.png")
    result = cli("train", "train", "--data-root", str(tmp_path), "--eval-set", str(mini_root / "Set5"))
    assert_clean_error(result, "smaller than the patch size")


@pytest.mark.parametrize("flags", [("--loss-border", "16"), ("--zooms", "1", "0"), ("--zooms", "1.5")])
def test_impossible_training_options(cli, mini_root, tmp_path, flags):
    result = cli("train", "train", *flags, "--data-root", str(mini_root), "--checkpoint-dir", str(tmp_path))
    assert_clean_error(result, flags[0])
    assert not any(tmp_path.iterdir())


def test_unwritable_output_or_comparison_is_refused_before_any_work(cli, weights, lr_image, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    result = cli("super_resolve", "--checkpoint", str(weights), str(lr_image), "--output", str(blocker / "o.png"))
    assert_clean_error(result, "cannot write output", f"{blocker} is a file, not a folder")
    result = cli("super_resolve", "--checkpoint", str(weights), str(lr_image), "--output", str(tmp_path / "o.png"),
                 "--compare", str(blocker / "sub" / "c.png"))
    assert_clean_error(result, "cannot write comparison", f"{blocker} is a file, not a folder")
    assert result.stdout == "" and not (tmp_path / "o.png").exists()


def test_download_into_a_folder_that_cannot_be_made(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    result = cli("download", "download", "--root", str(blocker / "datasets"), "--sets", "Set5")
    assert result.returncode == 2
    assert_clean_error(result, f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "a file where a folder should be" and list(tmp_path.iterdir()) == [blocker]


def test_a_scale_without_a_model_says_how_each_command_takes_one(cli, mini_root):
    evaluated = cli("train", "evaluate", "--scale", "5", "--data-root", str(mini_root))
    assert_clean_error(evaluated, "no 915 model is shipped for x5", "python train.py evaluate CHECKPOINT")
    assert "--checkpoint" not in evaluated.stderr
    upscaled = cli("super_resolve", "--scale", "5", "lr.png")
    assert_clean_error(upscaled, "no 915 model is shipped for x5", "--checkpoint CKPT")
    for scale in ("0", "1", "-3"):
        assert_clean_error(cli("super_resolve", "--scale", scale, "lr.png"), "--scale must be at least 2", "x2, x3, x4")
    assert "x2, x3 and x4" in cli("super_resolve", "--version").stdout


def test_a_run_that_fails_before_its_first_save_leaves_no_folder(cli, mini_root, tmp_path):
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = cli("train", "train", "--data-root", str(mini_root), "--eval-set", str(evaluation),
                 "--checkpoint-dir", str(tmp_path / "runs" / "first"))
    assert_clean_error(result, "broken.png")
    assert not (tmp_path / "runs").exists()


def test_a_new_run_never_replaces_an_earlier_runs_files(cli, mini_root, tmp_path):
    """Issue 60: `train` into a folder that holds a run (or only its interrupted.pth) ends in one line
    before any work, every file as it was; --overwrite starts over, says what it replaces, and leaves
    the new run's files alone, the earlier run's others removed at its first save."""
    flags = ("--num-epoch", "2", "--batch-size", "8", "--save-freq", "1", "--data-root", str(mini_root))
    folder = tmp_path / "run"
    assert cli("train", "train", *flags, "--checkpoint-dir", str(folder)).returncode == 0
    (folder / "interrupted.pth").write_bytes((folder / "last.pth").read_bytes())
    (folder / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = cli("train", "train", *flags, "--network", "9-5-5", "--checkpoint-dir", str(folder))
    assert_clean_error(result, "already holds a run", "resume", str(folder / "interrupted.pth"), "--overwrite")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "interrupted.pth").write_bytes(before["last.pth"])
    assert_clean_error(cli("train", "train", *flags, "--checkpoint-dir", str(alone)), "already holds a run")
    assert [p.name for p in alone.iterdir()] == ["interrupted.pth"]

    again = cli("train", "train", *flags[2:], "--num-epoch", "1", "--overwrite", "--checkpoint-dir", str(folder))
    assert again.returncode == 0, again.stderr
    assert "replaces best.pth, checkpoint.1.pth, checkpoint.2.pth, interrupted.pth, last.pth" in again.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["best.pth", "checkpoint.1.pth", "last.pth", "notes.txt"]
    assert torch.load(folder / "last.pth", weights_only=True)["epoch"] == 1
    assert "overwrite" not in torch.load(folder / "last.pth", weights_only=True)["args"]


def broken_weights(how: str) -> dict:
    """A 9-5-5 state dict with one thing wrong."""
    weights = SRCNN(Shape((9, 5, 5))).state_dict()
    if how == "extra layer":
        weights |= {"conv4.weight": torch.zeros(3, 3, 5, 5), "conv4.bias": torch.zeros(3)}
    elif how == "two channels in":
        weights["conv1.weight"] = torch.zeros(64, 2, 9, 9)
    elif how == "even kernel":
        weights["conv2.weight"] = torch.zeros(32, 64, 4, 4)
    elif how == "widths disagree":
        weights["conv2.weight"] = torch.zeros(32, 48, 5, 5)
    elif how == "missing bias":
        del weights["conv3.bias"]
    return weights


@pytest.mark.parametrize(("how", "words"), [
    ("extra layer", ("unexpected keys conv4.bias, conv4.weight",)),
    ("two channels in", ("conv1 takes 2 input channels", "1 (Y) or 3 (RGB)")),
    ("even kernel", ("conv2 has a 4x4 kernel", "odd")),
    ("widths disagree", ("conv2 takes 48 channels, but conv1 gives 64",)),
    ("missing bias", ("missing keys conv3.bias",)),
])
def test_weights_load_strictly_and_errors_name_the_layer(cli, how, words, lr_image, tmp_path):
    """Issue 60: an extra layer is not dropped silently, and a wrong layer is named, not blamed on conv1."""
    path = tmp_path / "weights.pth"
    torch.save(broken_weights(how), path)
    assert_clean_error(cli("super_resolve", "--checkpoint", str(path), str(lr_image), "--output",
                           str(tmp_path / "o.png")), *words)
    assert_clean_error(cli("train", "inspect", str(path)), *words)
    assert not (tmp_path / "o.png").exists()


def test_a_bare_state_dict_takes_its_scale_from_the_command(cli, weights, lr_image, mini_root, tmp_path):
    """Issue 60: a bare file records no scale, so --scale 2 is taken, not refused as contradicting x3;
    `inspect` says what a bare file is instead of "epoch None, version None"."""
    result = cli("super_resolve", "--checkpoint", str(weights), "--scale", "2", str(lr_image), "--output",
                 str(tmp_path / "o.png"))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "o.png").size == (24, 20)
    evaluated = cli("train", "evaluate", str(weights), "--scale", "4", "--data-root", str(mini_root), "--sets", "Set5")
    assert evaluated.returncode == 0 and f"{weights}: x4" in evaluated.stdout, evaluated.stderr
    shown = cli("train", "inspect", str(weights)).stdout
    assert "a bare state_dict" in shown and "taken as x3 unless" in shown and "None" not in shown
    assert_clean_error(cli("super_resolve", "--checkpoint", str(weights), "--scale", "1", str(lr_image)), "--scale")


# Every numeric flag through its bounds (issue 69: `--seed -1` ended in a traceback after loading the data,
# `--min-lr -1` trained and saved a model of 7.7 dB): (values outside its range, values inside it), the other
# arguments at their defaults (--lr 1e-4, --min-lr 1e-6, --scale 3, --patch-size 33, --loss-border 0) and
# --lr-decay cosine (where --min-lr must not exceed --lr).
OUTSIDE_AND_INSIDE = {
    "lr": (st.floats(max_value=0) | st.sampled_from([math.inf, math.nan]), st.floats(1e-6, 1.0)),
    "min_lr": (st.floats(max_value=-1e-12) | st.floats(min_value=1.001e-4) | st.just(math.nan), st.floats(0, 1e-4)),
    "warmup": (st.floats(max_value=-1e-12) | st.sampled_from([math.inf, math.nan]), st.floats(0, 1e4)),
    "ema_decay": (st.floats(max_value=-1e-12) | st.floats(min_value=1) | st.just(math.nan), st.floats(0, 0.99999)),
    "batch_size": (st.integers(max_value=0), st.integers(1, 4096)),
    "num_epoch": (st.floats(max_value=0) | st.sampled_from([math.inf, math.nan]), st.floats(1e-3, 1e4)),
    "save_freq": (st.integers(max_value=0), st.integers(1, 10**6)),
    "seed": (st.integers(max_value=-1) | st.integers(min_value=2**32), st.integers(0, 2**32 - 1)),
    "patch_size": (st.integers(max_value=2), st.integers(3, 1024)),
    "stride": (st.integers(max_value=0), st.integers(1, 1024)),
    "scale": (st.integers(max_value=1) | st.integers(min_value=34), st.integers(2, 33)),
    "loss_border": (st.integers(max_value=-1) | st.integers(min_value=16), st.integers(0, 15)),
    "zooms": (st.floats(max_value=0) | st.floats(min_value=1.0001) | st.just(math.nan), st.floats(1e-3, 1)),
    "widths": (st.integers(max_value=0), st.integers(1, 4096)),
    "workers": (st.integers(max_value=-1), st.integers(0, 64)),
    "pass_patches": (st.integers(max_value=0), st.integers(1, 4096)),
    "tensorboard_images": (st.integers(max_value=-1), st.integers(0, 1000)),
}


def test_every_numeric_training_flag_has_a_rule_walked_here():
    import options
    from train import build_parser

    numeric = {action.dest for action in build_parser()[1]._actions if action.type in (int, float, options.epochs)}
    assert numeric == set(OUTSIDE_AND_INSIDE) == set(options.RULES)


def flag_value(key: str, value) -> list[str]:
    if key == "widths":
        return ["--widths", str(value), "64"]
    return [f"--{key.replace('_', '-')}={value}"]  # '=': argparse takes -inf as a value, not as a flag


# resume's arguments are the checkpoint's: these make them what the ranges above assume
CONTEXT = {"lr_decay": "cosine", "lr": 1e-4, "min_lr": 1e-6, "patch_size": 33, "num_epoch": 1000}


@pytest.mark.parametrize("command", ["train", "resume"])
@pytest.mark.parametrize("key", list(OUTSIDE_AND_INSIDE))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_numeric_flag_outside_its_range_ends_in_one_line_naming_it_before_any_work(cli, tmp_path, command, key,
                                                                                    data):
    """Outside its range: one line naming the flag, before any data is read (there is none at the data
    root) or any folder made; inside it, options.check_training_args accepts it."""
    from options import check_training_args
    from train import build_parser

    outside, inside = OUTSIDE_AND_INSIDE[key]
    where = ["--data-root", str(tmp_path / "no data"), "--checkpoint-dir", str(tmp_path / "ck")]
    context = [part for other, value in CONTEXT.items() if other != key for part in flag_value(other, value)]
    start = ["train"] if command == "train" else ["resume", str(ROOT / "checkpoint.pth")]
    result = cli("train", *start, *context, *flag_value(key, data.draw(outside)), *where)
    assert_clean_error(result, f"--{key.replace('_', '-')}")
    assert "no data" not in result.stderr and not (tmp_path / "ck").exists()
    defaults = vars(build_parser()[1].parse_args([])) | {"lr_decay": "cosine"}
    value = data.draw(inside)
    check_training_args({**defaults, key: [value, 64] if key == "widths" else [value] if key == "zooms" else value})


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scale=st.integers(max_value=1), crop=st.tuples(st.integers(max_value=-1), st.integers(max_value=0)))
def test_evaluate_and_super_resolve_refuse_numbers_outside_their_range(cli, weights, lr_image, scale, crop):
    """Their numeric flags: --scale (at least 2, with a checkpoint or without) and --crop's x, y, w, h."""
    for result in (cli("train", "evaluate", f"--scale={scale}"), cli("super_resolve", f"--scale={scale}", "x.png"),
                   cli("train", "evaluate", str(weights), f"--scale={scale}"),
                   cli("super_resolve", "--checkpoint", str(weights), f"--scale={scale}", str(lr_image))):
        assert_clean_error(result, "--scale must be at least 2")
    for x, w in ((crop[0], 4), (0, crop[1])):
        result = cli("super_resolve", "--checkpoint", str(weights), str(lr_image), "--compare", "c.png",
                     f"--crop=0,{x},{w},4")
        assert result.returncode == 2 and "Traceback" not in result.stderr and "--crop" in result.stderr
