import torch

from model import SRCNN, init_identity_


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


def test_identity_init_passes_input_through():
    torch.manual_seed(0)
    model = SRCNN()
    init_identity_(model, noise_std=0.0)
    x = torch.rand(1, 3, 20, 20)
    assert torch.allclose(model(x), x, atol=1e-6)


def test_moving_average_moves_toward_the_weights_by_one_minus_decay():
    from train import update_ema

    model, ema = SRCNN(), SRCNN()
    before = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, model, decay=0.75, step=1000)
    for average, old, weight in zip(ema.parameters(), before, model.parameters(), strict=True):
        assert torch.allclose(average, 0.75 * old + 0.25 * weight)


def test_moving_average_forgets_the_initial_weights_in_its_first_steps():
    from train import update_ema

    model, ema = SRCNN(), SRCNN()
    before = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, model, decay=0.999, step=0)  # (1 + 0) / (10 + 0): 90% of the way to the weights
    for average, old, weight in zip(ema.parameters(), before, model.parameters(), strict=True):
        assert torch.allclose(average, 0.1 * old + 0.9 * weight)


def test_optimizer_steps_counts_adams_steps():
    from train import optimizer_steps

    model = SRCNN()
    optimizer = torch.optim.Adam(model.parameters())
    assert optimizer_steps(optimizer) == 0
    for _ in range(3):
        model(torch.rand(1, 3, 8, 8)).mean().backward()
        optimizer.step()
    assert optimizer_steps(optimizer) == 3
