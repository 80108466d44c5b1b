"""The CLIs end to end as a user runs them: in a fresh process where that is what a test is about,
else in this one (the `cli` fixture), which saves each call the start-up of torch."""

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint import load as load_checkpoint
from checkpoint import save as save_checkpoint
from conftest import ROOT, assert_clean_error, run
from data import downscale, image_to_tensor, modcrop, upscale
from metrics import psnr
from train import learning_rate

TRAIN = ("--num-epoch", "1", "--batch-size", "8", "--lr", "1e-3", "--save-freq", "1")


@pytest.fixture(scope="module")
def trained(mini_root, tmp_path_factory):
    """One epoch of training on the tiny data root; returns its checkpoint folder."""
    out = tmp_path_factory.mktemp("run")
    result = run("train.py", "train", *TRAIN, "--data-root", str(mini_root), "--checkpoint-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "epoch    1" in result.stdout and "PSNR" in result.stdout
    return out


def test_train_writes_every_checkpoint_loadable_with_weights_only(trained):
    assert sorted(p.name for p in trained.iterdir()) == ["best.pth", "checkpoint.1.pth", "last.pth"]
    for path in trained.iterdir():
        state = torch.load(path, weights_only=True)
        assert {"model", "optimizer", "args", "epoch", "history", "best_psnr", "rng", "scale", "version"} <= set(state)
        assert state["epoch"] == 1 and state["scale"] == 3 and isinstance(state["args"], dict)
        assert set(state["history"][0]) == {"epoch", "loss", "psnr", "ssim", "seconds", "patches_per_s", "lr"}


def test_inspect_text_json_and_plot(cli, trained, tmp_path):
    text = run("train.py", "inspect", str(trained / "last.pth"))
    assert text.returncode == 0 and "20,099 parameters" in text.stdout and "lr" in text.stdout
    plot = cli("train", "inspect", str(trained / "last.pth"), "--plot", str(tmp_path / "plots" / "curve.png"))
    assert plot.returncode == 0 and plot.stdout == f"plot written to {tmp_path / 'plots' / 'curve.png'}\n"
    assert Image.open(tmp_path / "plots" / "curve.png").size == (1000, 450)  # loss, PSNR: too short for a zoom
    result = cli("train", "inspect", str(trained / "last.pth"), "--json")
    summary = json.loads(result.stdout)
    assert summary["epoch"] == 1 and summary["parameters"] == 20_099
    assert summary["args"]["batch_size"] == 8 and len(summary["history"]) == 1


@pytest.fixture(scope="module")
def long_run(trained, tmp_path_factory):
    """The trained checkpoint with a made-up history of 60 epochs (no need to train them)."""
    checkpoint = load_checkpoint(trained / "last.pth")
    record = checkpoint["history"][0]
    checkpoint["history"] = [{**record, "epoch": e, "psnr": 30 + e / 30, "seconds": 20.0} for e in range(1, 61)]
    checkpoint["epoch"] = 60
    path = tmp_path_factory.mktemp("long") / "long.pth"
    save_checkpoint(checkpoint, path)
    return path


def test_inspect_lists_the_last_epochs_unless_asked_for_all(cli, long_run):
    def epochs(text):
        return [int(line.split()[0]) for line in text.splitlines() if line.split() and line.split()[0].isdigit()]

    short = cli("train", "inspect", str(long_run)).stdout
    assert epochs(short) == [56, 57, 58, 59, 60] and "the last 5 of 60 epochs (--history shows all" in short
    assert "from epoch 0: python train.py train" in short and "20.0 minutes of training" in short
    assert epochs(cli("train", "inspect", str(long_run), "--history").stdout) == list(range(1, 61))
    reached = cli("train", "inspect", str(long_run), "--reach", "31", "32.5").stdout.splitlines()[-1].split()
    assert reached == [str(long_run), "10.0", "-", "32.000", "after", "20.0"]  # 31 dB at epoch 30, 20 s an epoch


def test_plots_of_one_long_run_and_of_several_runs(cli, trained, long_run, tmp_path):
    assert cli("train", "inspect", str(long_run), "--plot", str(tmp_path / "long.png")).returncode == 0
    assert Image.open(tmp_path / "long.png").size == (1500, 450)  # long enough for the third, zoomed panel
    result = cli("train", "inspect", str(trained / "last.pth"), str(long_run), "--plot", str(tmp_path / "runs.png"))
    assert result.returncode == 0 and result.stdout == f"plot written to {tmp_path / 'runs.png'}\n"
    assert Image.open(tmp_path / "runs.png").size == (1000, 550)
    texts = cli("train", "inspect", str(trained / "last.pth"), str(long_run)).stdout
    assert f"{trained / 'last.pth'}: SRCNN x3" in texts and f"{long_run}: SRCNN x3" in texts
    assert len(json.loads(cli("train", "inspect", str(trained / "last.pth"), str(long_run), "--json").stdout)) == 2


def test_filters_picture_is_drawn_from_the_weights(cli, trained, tmp_path):
    result = cli("train", "inspect", str(trained / "last.pth"), "--filters", str(tmp_path / "a.png"))
    assert result.returncode == 0 and result.stdout == f"filters written to {tmp_path / 'a.png'}\n"
    checkpoint = load_checkpoint(trained / "last.pth")
    checkpoint["model"]["conv1.weight"] = checkpoint["model"]["conv1.weight"].flip(-1)  # other filters
    save_checkpoint(checkpoint, tmp_path / "flipped.pth")
    assert cli("train", "inspect", str(tmp_path / "flipped.pth"), "--filters", str(tmp_path / "b.png")).returncode == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB")) for name in "ab")
    assert a.shape == b.shape == (680, 640, 3)  # an 8 x 8 grid, 0.8 inch a filter at 100 dpi, and a title
    assert not np.array_equal(a, b)
    assert_clean_error(cli("train", "inspect", str(trained / "last.pth"), str(tmp_path / "flipped.pth"),
                           "--filters", str(tmp_path / "c.png")), "one checkpoint")


def test_resume_overrides_only_given_flags(cli, trained, tmp_path):
    result = run("train.py", "resume", str(trained / "last.pth"), "--num-epoch", "2",
                 "--checkpoint-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert state["args"]["num_epoch"] == 2 and state["args"]["batch_size"] == 8 and state["args"]["lr"] == 1e-3
    assert [run["epoch"] for run in state["commands"]] == [0, 1]
    assert state["commands"][0]["command"].startswith("python train.py train --num-epoch 1 --batch-size 8")
    assert state["commands"][1]["command"] == (
        f"python train.py resume {trained / 'last.pth'} --num-epoch 2 --checkpoint-dir {tmp_path}"
    )
    shown = cli("train", "inspect", str(tmp_path / "last.pth")).stdout
    assert f"from epoch 1: python train.py resume {trained / 'last.pth'}" in shown


def test_evaluate_reports_bicubic_and_model(cli, trained, mini_root):
    result = run("train.py", "evaluate", str(trained / "best.pth"), "--data-root", str(mini_root), "--sets", "Set5")
    assert result.returncode == 0, result.stderr
    assert "bicubic" in result.stdout and "Set5" in result.stdout and "pil bicubic" in result.stdout
    assert "Set5 SRCNN:" in result.stderr and "/2 [" in result.stderr  # a progress bar for each set, on stderr
    found = cli("train", "evaluate", str(trained / "best.pth"), "--data-root", str(mini_root),
                "--degradation", "matlab")  # every evaluation set found in the data root: here Set5 alone
    assert found.returncode == 0 and "matlab bicubic" in found.stdout
    assert [line.split()[0] for line in found.stdout.splitlines()[2:]] == ["Set5"]


def test_super_resolve_with_ground_truth(cli, trained, mini_root, tmp_path):
    hr = Image.open(mini_root / "Set5" / "scene3.png")
    downscale(hr, 3).save(tmp_path / "lr.bmp")
    result = run("super_resolve.py", "--checkpoint", str(trained / "best.pth"), str(tmp_path / "lr.bmp"),
                 "--gt", str(mini_root / "Set5" / "scene3.png"))
    assert result.returncode == 0, result.stderr
    out = Image.open(tmp_path / "lr_srcnn_x3.png")
    assert out.size == (60, 60) and out.mode == "RGB"
    printed = dict(re.findall(r"^(\w+)\s+PSNR (\d+\.\d+) dB", result.stdout, flags=re.MULTILINE))
    gt = image_to_tensor(modcrop(hr, 3))
    assert printed == {"bicubic": f"{psnr(image_to_tensor(upscale(downscale(hr, 3), 3)), gt, shave=3):.2f}",
                       "SRCNN": f"{psnr(image_to_tensor(out), gt, shave=3):.2f}"}
    matlab = cli("super_resolve", "--checkpoint", str(trained / "best.pth"), str(tmp_path / "lr.bmp"),
                 "--degradation", "matlab", "--output", str(tmp_path / "matlab.png"))
    assert matlab.returncode == 0, matlab.stderr
    assert out.tobytes() != Image.open(tmp_path / "matlab.png").tobytes()  # another bicubic before the network


def test_resume_is_exact(cli, mini_root, tmp_path):
    """2 epochs in one run == 1 epoch + resume for 1 in a fresh process, bit for bit (augmentation,
    fresh crops and the weights' moving average on): both the averaged and the training weights."""
    flags = ("--batch-size", "8", "--lr", "1e-3", "--augment", "--fresh-crops", "--ema-decay", "0.9",
             "--data-root", str(mini_root))
    assert cli("train", "train", *flags, "--num-epoch", "2", "--checkpoint-dir", str(tmp_path / "a")).returncode == 0
    assert cli("train", "train", *flags, "--num-epoch", "1", "--checkpoint-dir", str(tmp_path / "b")).returncode == 0
    result = run("train.py", "resume", str(tmp_path / "b" / "last.pth"), "--num-epoch", "2")
    assert result.returncode == 0, result.stderr
    a = torch.load(tmp_path / "a" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pth", weights_only=True)
    for key in ("model", "training_weights"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert not torch.equal(a["model"]["conv1.weight"], a["training_weights"]["conv1.weight"])


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_the_recipe_run_twice_gives_the_same_weights(cli, mini_root, tmp_path, amp):
    """A short version of the x3 recipe (docs/training.md), twice: seeded and deterministic on the CPU,
    in a fresh process and in this one, after whatever the tests before it left behind; in float32 and
    with --amp bf16 (in bf16 where this CPU computes it natively, else in float32, as recorded)."""
    from step import bf16_faster, native_bf16

    recipe = ("--lr", "1e-3", "--lr-decay", "cosine", "--min-lr", "1e-5", "--batch-size", "32", "--patch-size", "48",
              "--stride", "21", "--zooms", "1", "0.9", "0.8", "--augment", "--fresh-crops", "--ema-decay", "0.9998",
              "--num-epoch", "1", "--amp", amp, "--data-root", str(mini_root))
    result = run("train.py", "train", *recipe, "--checkpoint-dir", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    result = cli("train", "train", *recipe, "--checkpoint-dir", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    a, b = (torch.load(tmp_path / name / "last.pth", weights_only=True) for name in ("a", "b"))
    for key in ("model", "training_weights"):  # the moving average and the weights it averages
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
               for i in a["optimizer"]["state"])
    assert [h["psnr"] for h in a["history"]] == [h["psnr"] for h in b["history"]]
    probe = a["args"].get("bf16_probe")  # timed at the start where bf16 is native; it decides
    assert (probe is not None) == (amp == "bf16" and native_bf16() is not None)
    used = "bf16" if probe and bf16_faster(probe) else "float32"
    assert a["commands"][0]["precision"] == b["commands"][0]["precision"] == used
    assert all(t.dtype == torch.float32 for part in ("model", "training_weights") for t in a[part].values())


def test_version_flags(cli):
    for module in ("train", "super_resolve"):
        result = cli(module, "--version")
        assert result.returncode == 0 and "srcnn" in result.stdout and "Dong" in result.stdout


def test_output_piped_into_head_is_no_traceback(trained):
    result = subprocess.run(f"{sys.executable} train.py inspect {trained / 'last.pth'} | head -1", shell=True,
                            capture_output=True, text=True, cwd=ROOT)
    assert "SRCNN x3" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [("train", "train"), ("train", "resume"), ("train", "inspect"),
                                     ("train", "evaluate"), ("super_resolve",), ("download", "download"), ("bench",)])
def test_every_flag_has_a_help_line_with_its_default(cli, command):
    result = cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    flags, current = [], None
    for line in result.stdout.splitlines():
        if line.startswith("  -"):
            current = [line.strip()]
            flags.append(current)
        elif current is not None and line.startswith("    "):
            current.append(line.strip())  # the help of the flag above, wrapped or on its own line
        else:
            current = None
    described = [" ".join(block) for block in flags if not block[0].startswith(("-h, --help", "--version"))]
    assert len(described) >= 2
    for text in described:
        assert "(default: " in text or "(required)" in text, text


def test_data_py_runs_the_download_command():
    result = run("data.py", "download", "--help")
    assert result.returncode == 0 and "--base-url" in result.stdout, result.stderr


def test_the_warm_up_rises_to_the_learning_rate_and_never_above():
    args = {"lr": 1e-3, "lr_decay": "none", "warmup": 1.0, "num_epoch": 10, "min_lr": 1e-6}
    rates = [learning_rate(args, step / 735) for step in range(2 * 735)]
    assert 0 < rates[0] < 1e-4 and max(rates) == 1e-3 and rates[734] == 1e-3
    assert all(a <= b for a, b in zip(rates, rates[1:], strict=False))
    cosine = [learning_rate({**args, "lr_decay": "cosine"}, step / 100) for step in range(1000)]
    assert max(cosine) <= 1e-3 and cosine[-1] >= 1e-6


def test_the_cosine_schedule_is_pinned_at_its_middle_and_end_and_never_rises_after_the_warm_up():
    """Issue 60: a schedule run as cos(2 pi t), back to --lr at the end, had passed the bounds above."""
    args = {"lr": 1e-3, "lr_decay": "cosine", "warmup": 1.0, "num_epoch": 10, "min_lr": 1e-5}
    assert learning_rate(args, 5.0) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-12)
    assert learning_rate(args, 10.0) == pytest.approx(1e-5, rel=1e-12)
    assert learning_rate(args, 2.5) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 4)))
    after = [learning_rate(args, 1 + step / 100) for step in range(901)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False)) and after[0] < 1e-3


@pytest.mark.parametrize("bf16_ms, used", [(30.0, "float32"), (20.0, "bf16")])
def test_amp_bf16_trains_in_what_the_probe_found_faster_records_it_and_resume_keeps_it(
        cli, mini_root, tmp_path, monkeypatch, bf16_ms, used):
    """Issue 69: on an Intel Xeon that reports AVX512_BF16 without AMX, --amp bf16 trained 0.67x as fast
    as float32 without a word. A probe of the run's own step decides (here its figures made up, the CPU
    made to look native): where bf16 is not faster, one note with both figures and float32; the figures
    and the choice recorded, shown by inspect, and kept by resume without probing again (an --amp given
    to resume probes anew)."""
    import step

    monkeypatch.setattr(step, "native_bf16", lambda: "AVX512_BF16")
    probes = []
    monkeypatch.setattr(step, "bf16_probe", lambda *a: probes.append(a) or {"float32_ms": 25.0, "bf16_ms": bf16_ms})
    flags = ("--batch-size", "8", "--num-epoch", "1", "--amp", "bf16", "--data-root", str(mini_root))
    result = cli("train", "train", *flags, "--checkpoint-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    figures = f"probed: a step {bf16_ms:.1f} ms in bf16 against 25.0 in float32"
    assert figures in result.stderr
    assert ("not faster on this CPU" in result.stderr) == (used == "float32")
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["args"]["bf16_probe"] == {"float32_ms": 25.0, "bf16_ms": bf16_ms}
    assert state["commands"][0]["precision"] == used and len(probes) == 1
    assert probes[0][1:] == (8, 33, 8, 0)  # the run's batch, patch size, pass and loss border
    shown = cli("train", "inspect", str(tmp_path / "last.pth")).stdout
    assert figures in shown and "bf16_probe" in shown
    assert cli("train", "resume", str(tmp_path / "last.pth"), "--num-epoch", "2").returncode == 0
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["commands"][1]["precision"] == used and len(probes) == 1  # kept, not probed again
    assert cli("train", "resume", str(tmp_path / "last.pth"), "--num-epoch", "3", "--amp", "bf16").returncode == 0
    assert len(probes) == 2


def test_the_bf16_probe_times_both_precisions_and_touches_nothing_of_the_run():
    from model import SRCNN, Shape
    from step import bf16_probe

    torch.manual_seed(1)
    model = SRCNN(Shape((9, 5, 5), channels=1))
    weights, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    probe = bf16_probe(model, 4, 16, 2, 1, repeats=1)
    assert set(probe) == {"float32_ms", "bf16_ms"} and all(0 < ms < 60_000 for ms in probe.values())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_fractional_num_epoch_ends_the_last_epoch_and_the_schedule_together(cli, mini_root, tmp_path):
    """Issue 70: a run's length in fractional epochs (deterministic: a share of the last epoch's
    batches), the cosine schedule at --min-lr on the last batch; resume continues from it."""
    flags = ("--batch-size", "4", "--lr", "1e-3", "--lr-decay", "cosine", "--min-lr", "1e-5", "--warmup", "0.5",
             "--data-root", str(mini_root), "--checkpoint-dir", str(tmp_path))
    result = cli("train", "train", *flags, "--num-epoch", "1.5")
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    whole, half = state["history"]
    assert state["epoch"] == 2 and state["args"]["num_epoch"] == 1.5
    steps = math.ceil(round(whole["patches_per_s"] * whole["seconds"]) / 4)  # the first epoch's batches of 4
    assert half["patches_per_s"] * half["seconds"] == pytest.approx(4 * round(steps / 2), abs=1e-6)
    assert half["lr"] == pytest.approx(learning_rate(state["args"], 1 + (round(steps / 2) - 1) / steps))
    assert learning_rate(state["args"], 1.5) == pytest.approx(1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "checkpoint.2.pth", "last.pth"]
    assert cli("train", "resume", str(tmp_path / "last.pth"), "--num-epoch", "3").returncode == 0
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 3


def test_a_resume_with_nothing_to_do_says_so_before_any_work(cli, trained, tmp_path, monkeypatch):
    """Issue 69: `resume last.pth --num-epoch 2` at epoch 3 loaded the data, printed "epochs 4..2" and
    "done"; from a shipped model it left an empty runs/x2_120/ behind."""
    monkeypatch.chdir(tmp_path)
    result = cli("train", "resume", str(trained / "last.pth"), "--num-epoch", "1")
    assert_clean_error(result, "nothing to do", "has trained 1 epochs", "--num-epoch")
    result = cli("train", "resume", str(ROOT / "models" / "srcnn_x2.pth"))
    assert_clean_error(result, "nothing to do")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_given_as_a_checkpoint_is_named_as_one(cli, trained, tmp_path):
    """Issue 69: a folder said "checkpoint not found" though it exists; now it says what it is, and
    names the run's last.pth inside."""
    for command in (("train", "resume"), ("train", "inspect"), ("train", "evaluate"),
                    ("super_resolve", "x.png", "--checkpoint")):
        result = cli(command[0], *command[1:], str(trained))
        assert_clean_error(result, f"{trained} is a folder, not a checkpoint file", str(trained / "last.pth"))
    assert_clean_error(cli("train", "inspect", str(tmp_path)), "is a folder, not a checkpoint file")


@pytest.mark.parametrize("recipe", ["speedrun_32.39.args", "speedrun_32.75.args"])
def test_each_speedrun_recipe_parses_and_trains_a_few_steps(cli, mini_root, tmp_path, monkeypatch, recipe):
    """Issue 70: the speedrun recipes, run as the docs run them (@recipes/...), for a few steps of the tiny
    set (--num-epoch 0.05: a share of one epoch), not to their targets: the files keep parsing and running,
    from scratch, on T91 alone, with MSE and Adam (there is no other loss or optimizer)."""
    monkeypatch.chdir(ROOT)
    lines = (ROOT / "recipes" / recipe).read_text()
    assert "--init" not in lines and "--train-set" not in lines  # from scratch, on T91 (the default)
    result = cli("train", "train", f"@recipes/{recipe}", "--num-epoch", "0.05", "--data-root", str(mini_root),
                 "--checkpoint-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and state["args"]["train_set"] == ["T91"] and state["args"]["init"] == "default"
