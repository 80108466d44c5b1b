"""ONNX: the export, a model that onnxruntime runs at any size giving what the network gives; and
ONNX Runtime as the engine of the inference path on the CPU."""

import re

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image, ImageFilter

from checkpoint import load_model
from conftest import ROOT, assert_clean_error
from model import conv_by_phase
from onnx_engine import OnnxRuntimeNetwork, engine_for, onnx_model
from utils import UserError


def test_exported_model_runs_in_onnxruntime_at_any_size_like_the_network(cli, tmp_path):
    path = tmp_path / "deploy" / "srcnn.onnx"
    result = cli("super_resolve", "--checkpoint", str(ROOT / "checkpoint.pth"), "--export", str(path))
    assert result.returncode == 0 and f"ONNX model written to {path}" in result.stdout
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = load_model(ROOT / "checkpoint.pth", torch.device("cpu"))[0]
    generator = torch.Generator().manual_seed(0)
    for shape in ((1, 3, 40, 56), (2, 3, 23, 31)):
        x = torch.rand(*shape, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        out = session.run(None, {"input": x.numpy()})[0]
        assert out.shape == expected.shape and np.abs(out - expected).max() < 1e-4


def test_without_inputs_or_export_is_a_usage_error(cli):
    result = cli("super_resolve", "--checkpoint", str(ROOT / "checkpoint.pth"))
    assert result.returncode == 2 and "INPUT (or --export)" in result.stderr and "Traceback" not in result.stderr


def test_export_to_an_unwritable_place_is_one_line(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    result = cli("super_resolve", "--checkpoint", str(ROOT / "checkpoint.pth"), "--export", str(blocker / "m.onnx"))
    assert_clean_error(result, "cannot write")


def test_onnx_runtime_runs_the_network_on_the_cpu_by_default_within_one_level(cli, tmp_path):
    model = load_model(ROOT / "checkpoint.pth", torch.device("cpu"))[0]
    assert isinstance(engine_for(model), OnnxRuntimeNetwork) and engine_for(model, "torch") is model
    lr = tmp_path / "lr.png"
    Image.effect_noise((90, 70), 60).convert("RGB").resize((45, 35)).save(lr)
    outputs = {}
    for engine in ("auto", "torch", "onnxruntime"):
        out = tmp_path / f"{engine}.png"
        result = cli("super_resolve", "--checkpoint", str(ROOT / "checkpoint.pth"), str(lr), "--engine", engine,
                     "--output", str(out))
        assert result.returncode == 0, result.stderr
        outputs[engine] = np.asarray(Image.open(out), dtype=np.int16)
    assert np.array_equal(outputs["auto"], outputs["onnxruntime"])
    difference = np.abs(outputs["auto"] - outputs["torch"])
    assert difference.max() <= 1 and (difference > 0).mean() < 0.001


def test_the_last_layer_by_phase_gives_the_same_sums_at_every_size():
    model = load_model(ROOT / "checkpoint.pth", torch.device("cpu"))[0]
    generator = torch.Generator().manual_seed(1)
    sessions = {(images, polyphase): onnxruntime.InferenceSession(
        onnx_model(model, images, polyphase).SerializeToString(), providers=["CPUExecutionProvider"])
        for images in (False, True) for polyphase in (False, True)}
    for batch, height, width in ((1, 1, 1), (1, 2, 3), (2, 21, 17), (1, 40, 56)):
        features = torch.rand(batch, 32, height, width, generator=generator)
        with torch.no_grad():
            assert (conv_by_phase(features, model.conv3) - model.conv3(features)).abs().max() < 1e-5
        x = torch.rand(batch, 3, height, width, generator=generator)
        plain, fast = (sessions[False, polyphase].run(None, {"input": x.numpy()})[0] for polyphase in (False, True))
        assert fast.shape == plain.shape == x.shape and np.abs(fast - plain).max() < 1e-5
        image = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()
        plain, fast = (sessions[True, polyphase].run(None, {"image": image})[0] for polyphase in (False, True))
        assert fast.shape == plain.shape == image.shape and np.abs(fast.astype(int) - plain).max() <= 1
        assert (fast != plain).mean() < 0.001


def test_an_onnx_runtime_too_old_for_the_graph_is_left_to_pytorch(monkeypatch):
    model = load_model(ROOT / "checkpoint.pth", torch.device("cpu"))[0]
    monkeypatch.setattr(onnxruntime, "__version__", "1.20.1")
    assert engine_for(model) is model
    with pytest.raises(UserError, match="onnxruntime>=1.21"):
        engine_for(model, "onnxruntime")
    monkeypatch.setattr(onnxruntime, "__version__", "1.21.0")
    assert isinstance(engine_for(model), OnnxRuntimeNetwork)


@pytest.mark.parametrize("model", ["915", "955"])
def test_the_deploy_pages_onnx_snippets_give_super_resolves_output(cli, tmp_path, monkeypatch, model):
    """docs/deploy.md's code, run as written on an exported RGB and Y model (issue 60: its one RGB
    snippet failed on a Y model's N x 1 x H x W input): within one 8-bit level of super_resolve.py."""
    monkeypatch.chdir(tmp_path)
    Image.effect_noise((30, 24), 60).convert("RGB").filter(ImageFilter.SMOOTH).save("lr.png")
    assert cli("super_resolve", "--model", model, "--export", "srcnn.onnx").returncode == 0
    assert cli("super_resolve", "--model", model, "lr.png", "--output", "ref.png", "--engine", "torch").returncode == 0
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "deploy.md").read_text(), flags=re.DOTALL)
    rgb = next(block for block in blocks if "InferenceSession" in block)
    exec(rgb if model == "915" else rgb.split("y = session.run")[0] + next(b for b in blocks if "y_in" in b), {})
    difference = np.abs(np.asarray(Image.open("sr.png"), dtype=int) - np.asarray(Image.open("ref.png"), dtype=int))
    assert difference.max() <= 1
