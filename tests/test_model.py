import pytest
import torch
import torch.nn.functional as F

from model import SRCNN, Shape, init_identity_


def test_layers_and_parameter_count():
    model = SRCNN()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "conv1.weight": (64, 3, 9, 9), "conv1.bias": (64,),
        "conv2.weight": (32, 64, 1, 1), "conv2.bias": (32,),
        "conv3.weight": (3, 32, 5, 5), "conv3.bias": (3,),
    }
    assert sum(p.numel() for p in model.parameters()) == 20_099


def test_output_has_input_size():
    out = SRCNN()(torch.rand(2, 3, 17, 23))
    assert out.shape == (2, 3, 17, 23)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("shape", [Shape(), Shape((9, 5, 5)), Shape((9, 3, 5), channels=1)])
@pytest.mark.parametrize("height, width", [(48, 48), (33, 33), (21, 16), (1, 2)])
def test_the_last_layer_by_phase_gives_the_plain_loss_and_gradients(shape, height, width, bf16):
    """Training on a CPU computes the last layer by phase: the same loss and the same gradients of
    every weight as nn.Conv2d's, within float32 rounding, on odd and even sizes; under bf16 autocast
    (--amp bf16 on a CPU) within bf16's: two units of its last place (8 significant bits, 2^-7 apart)."""
    generator = torch.Generator().manual_seed(height * width)
    model = SRCNN(shape)
    x = torch.rand(3, shape.channels, height, width, generator=generator)
    y = torch.rand(3, shape.channels, height, width, generator=generator)
    results = []
    for by_phase in (False, True):
        model.zero_grad()
        model.last_layer_by_phase = by_phase
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = F.mse_loss(out.float(), y)
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (plain_loss, plain), (phase_loss, phase) = results
    rtol = 2**-6 if bf16 else 1e-5
    assert torch.allclose(plain_loss, phase_loss, rtol=rtol)
    for name, gradient in plain.items():
        scale = gradient.abs().max()
        assert (phase[name] - gradient).abs().max() <= rtol * scale + 1e-9, name
    assert set(model.state_dict()) == set(SRCNN(shape).state_dict())  # no weights of its own


def test_identity_init_passes_input_through():
    torch.manual_seed(0)
    model = SRCNN()
    init_identity_(model, noise_std=0.0)
    x = torch.rand(1, 3, 20, 20)
    assert torch.allclose(model(x), x, atol=1e-6)
