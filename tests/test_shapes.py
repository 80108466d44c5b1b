"""The paper's other networks (--network F1-F2-F3, --widths N1 N2): each trains, saves, resumes,
loads, exports and upscales as the assignment's does, recorded in its checkpoint; a bare state_dict
is read by its weights' shapes; a shape that disagrees with the weights ends in one line."""

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

from checkpoint import load_model
from conftest import assert_clean_error
from model import SRCNN, Shape, init_identity_

SHAPES = {"9-3-5": ("--network", "9-3-5", "--widths", "16", "8"),
          "9-5-5": ("--network", "9-5-5", "--widths", "12", "6"),
          "9-5-5 Y": ("--network", "9-5-5", "--widths", "12", "6", "--channels", "y")}
QUICK = ("--num-epoch", "1", "--batch-size", "8", "--lr", "1e-3")


@pytest.mark.parametrize("name", SHAPES)
def test_a_shape_trains_resumes_loads_exports_and_upscales(cli, mini_root, tmp_path, name):
    out = tmp_path / "run"
    trained = cli("train", "train", *SHAPES[name], *QUICK, "--data-root", str(mini_root), "--checkpoint-dir", str(out))
    assert trained.returncode == 0, trained.stderr
    resumed = cli("train", "resume", str(out / "last.pth"), "--num-epoch", "2")
    assert resumed.returncode == 0, resumed.stderr
    model, scale, checkpoint = load_model(out / "last.pth", torch.device("cpu"))
    network, _, colour = name.partition(" ")
    channels = 1 if colour == "Y" else 3
    assert model.shape == Shape(tuple(map(int, network.split("-"))), tuple(checkpoint["args"]["widths"]), channels)
    assert checkpoint["epoch"] == 2 and checkpoint["args"]["network"] == network
    assert f"{network} with " in cli("train", "inspect", str(out / "last.pth")).stdout

    exported = tmp_path / "m.onnx"
    assert cli("super_resolve", "--checkpoint", str(out / "last.pth"), "--export", str(exported)).returncode == 0
    x = torch.rand(1, channels, 29, 37)
    with torch.no_grad():
        expected = model(x).numpy()
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - expected).max() < 1e-4

    Image.effect_noise((40, 30), 50).convert("RGB").save(tmp_path / "lr.png")
    outputs = []
    for engine in ("torch", "onnxruntime"):
        path = tmp_path / f"{engine}.png"
        result = cli("super_resolve", "--checkpoint", str(out / "last.pth"), str(tmp_path / "lr.png"),
                     "--engine", engine, "--output", str(path))
        assert result.returncode == 0, result.stderr
        outputs.append(np.asarray(Image.open(path), np.int16))
    assert outputs[0].shape == (90, 120, 3) and np.abs(outputs[0] - outputs[1]).max() <= 1  # within one level


def ycbcr(picture: np.ndarray) -> np.ndarray:
    """Y, Cb, Cr as MATLAB's rgb2ycbcr, from 8-bit RGB."""
    matrix = np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]]) / 255
    return picture.astype(np.float64) @ matrix.T + [16, 128, 128]


def test_a_y_network_keeps_the_colour_of_the_bicubic_input(cli, tmp_path):
    torch.manual_seed(0)
    model = SRCNN(Shape((9, 5, 5), (16, 8), channels=1))
    init_identity_(model)  # Y in, about Y out
    with torch.no_grad():
        model.conv3.bias += 0.05  # and a visible change of it
    torch.save(model.state_dict(), tmp_path / "y.pth")  # a bare state_dict: read as Y by its weights
    lr = tmp_path / "lr.png"
    Image.effect_noise((30, 20), 60).convert("RGB").point(lambda v: v // 2 + 64).save(lr)
    assert cli("super_resolve", "--checkpoint", str(tmp_path / "y.pth"), str(lr), "--engine", "torch",
               "--output", str(tmp_path / "sr.png")).returncode == 0
    sr = ycbcr(np.asarray(Image.open(tmp_path / "sr.png")))
    bicubic = Image.open(lr).resize((90, 60), Image.Resampling.BICUBIC)
    ours = ycbcr(np.asarray(bicubic))
    assert np.abs(sr[..., 1:] - ours[..., 1:]).max() < 2  # Cb and Cr: the bicubic input's, 8-bit rounded
    with torch.no_grad():
        y_in = torch.from_numpy(ours[..., 0] / 255).float()[None, None]
        expected = model(y_in)[0, 0].numpy() * 255
    assert np.abs(sr[..., 0] - expected).max() < 2  # Y: the network's, 8-bit rounded
    assert np.abs(sr[..., 0] - ours[..., 0]).mean() > 5


@pytest.mark.parametrize("channels", [3, 1])
def test_a_bare_state_dict_of_another_shape_loads_by_its_weights(tmp_path, channels):
    torch.manual_seed(0)
    shape = Shape((9, 5, 5), (64, 32), channels)
    torch.save(SRCNN(shape).state_dict(), tmp_path / "port.pth")  # as the popular ports publish 9-5-5 on Y
    model, scale, _ = load_model(tmp_path / "port.pth", torch.device("cpu"))
    assert model.shape == shape and scale == 3


def test_shape_flags_that_disagree_with_the_weights_end_in_one_line(cli, mini_root, tmp_path):
    out = tmp_path / "run"
    assert cli("train", "train", *SHAPES["9-3-5"], *QUICK, "--data-root", str(mini_root),
               "--checkpoint-dir", str(out)).returncode == 0
    checkpoint = torch.load(out / "last.pth", weights_only=True)
    checkpoint["args"]["network"] = "9-5-5"  # the record says 9-5-5, the weights are 9-3-5
    torch.save(checkpoint, tmp_path / "lying.pth")
    lying = str(tmp_path / "lying.pth")
    for command in (("super_resolve", "--checkpoint", lying, "--export", str(tmp_path / "m.onnx")),
                    ("train", "resume", lying), ("train", "inspect", lying)):
        assert_clean_error(cli(*command), "conv2.weight", "9-5-5")
    assert_clean_error(cli("train", "resume", str(out / "last.pth"), "--network", "9-5-5"), "9-3-5", "cannot change")
    assert_clean_error(cli("train", "train", "--init", str(out / "last.pth"), "--data-root", str(mini_root),
                           "--checkpoint-dir", str(tmp_path / "other")), "9-3-5", "--network")
