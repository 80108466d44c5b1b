"""torch.hub on a clone (source="local"): the shipped models as modules, and the upscaler, which
gives super_resolve.py's output bit for bit."""

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint import SHIPPED
from checkpoint import load as load_checkpoint
from conftest import ROOT, generated_image


def hub(entry: str, **kwargs):
    return torch.hub.load(str(ROOT), entry, source="local", **kwargs)


def test_the_entries_are_what_torch_hub_lists_with_their_help():
    """torch.hub.list and torch.hub.help read GitHub repositories only (torch 2.14 has no source="local"
    for them); what they list is every public callable of hubconf.py, and help is its docstring."""
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert [f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith("_")] == ["srcnn", "upscaler"]
    assert "weights_only" in hubconf.srcnn.__doc__ and "super_resolve.py" in hubconf.upscaler.__doc__


@pytest.mark.parametrize("network, scale", sorted(SHIPPED))
def test_the_model_holds_the_shipped_weights(network, scale):
    model = hub("srcnn", scale=scale, network=network)
    parameters = {"915": 20_099, "955": {3: 69_251, 1: 57_281}[model.shape.channels]}[network]  # 955: RGB or Y
    assert not model.training and sum(p.numel() for p in model.parameters()) == parameters
    shipped = load_checkpoint(SHIPPED[network, scale])["model"]
    assert all(torch.equal(value, shipped[key]) for key, value in model.state_dict().items())


def test_untrained_model_and_unknown_scale_or_model():
    fresh = hub("srcnn", pretrained=False)
    assert not torch.equal(fresh.conv1.weight, hub("srcnn").conv1.weight)
    fresh_955 = hub("srcnn", pretrained=False, network="955")  # the shipped model's network, untrained
    assert fresh_955.conv2.kernel_size == (5, 5) and fresh_955.shape == hub("srcnn", network="955").shape
    with pytest.raises(ValueError, match="no 915 SRCNN model is shipped for x5; choose scale 2, 3, 4"):
        hub("srcnn", scale=5)
    with pytest.raises(ValueError, match="no 955 SRCNN model is shipped for x5; choose scale 2, 3, 4"):
        hub("srcnn", scale=5, network="955")
    with pytest.raises(ValueError, match="network must be one of 915, 955, not '935'"):
        hub("srcnn", network="935")


@pytest.mark.parametrize("network, scale", sorted(SHIPPED))
def test_the_upscaler_gives_super_resolves_output(cli, tmp_path, network, scale):
    lr = generated_image(40, seed=scale).crop((0, 0, 40, 31))
    lr.save(tmp_path / "lr.png")
    assert cli("super_resolve", "--model", network, "--scale", str(scale), str(tmp_path / "lr.png"),
               "--output", str(tmp_path / "sr.png")).returncode == 0
    ours = hub("upscaler", scale=scale, network=network)(lr)
    assert ours.size == (40 * scale, 31 * scale)
    assert np.array_equal(np.asarray(ours), np.asarray(Image.open(tmp_path / "sr.png")))
