"""The SRCNN network: the assignment's 9-1-5 with 64/32 filters on RGB by default, and the other
shapes of the paper's studies (filter sizes such as 9-3-5 and 9-5-5, wider layers, the Y channel)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Shape:
    """Filter sizes f1-f2-f3 and widths n1, n2 of the three layers, and the channels in and out:
    3 (RGB) or 1 (the Y channel, as the paper's main tables). Odd filter sizes, so that padding of
    half a filter keeps the output the size of the input."""

    kernels: tuple[int, int, int] = (9, 1, 5)
    widths: tuple[int, int] = (64, 32)
    channels: int = 3

    def __post_init__(self) -> None:
        if len(self.kernels) != 3 or any(k < 1 or k % 2 == 0 for k in self.kernels):
            raise ValueError(f"filter sizes must be three odd numbers, not {self.kernels}")
        if len(self.widths) != 2 or any(n < 1 for n in self.widths):
            raise ValueError(f"widths must be two positive numbers, not {self.widths}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 3 (RGB) or 1 (Y), not {self.channels}")

    @property
    def receptive_radius(self) -> int:
        """How many pixels each way an output pixel sees: 6 for 9-1-5, 8 for 9-5-5."""
        return sum(k // 2 for k in self.kernels)

    @property
    def name(self) -> str:
        """As the paper and --network write it: 9-5-5."""
        return "-".join(map(str, self.kernels))

    def __str__(self) -> str:
        return f"{self.name} with {self.widths[0]}/{self.widths[1]} filters on {'RGB' if self.channels == 3 else 'Y'}"


ASSIGNMENT = Shape()  # Conv 3->64 9x9, ReLU, Conv 64->32 1x1, ReLU, Conv 32->3 5x5: 20,099 parameters


class SRCNN(nn.Module):
    """Maps a bicubic-upscaled image in [0, 1] (RGB, or its Y channel) to the high-resolution one, same size.

    `last_layer_by_phase` computes the last layer as conv_by_phase does: the same sums and the same
    weights, faster on a CPU (training sets it there); off, the plain convolution (the GPU's way)."""

    def __init__(self, shape: Shape = ASSIGNMENT) -> None:
        super().__init__()
        self.shape = shape
        (k1, k2, k3), (n1, n2), c = shape.kernels, shape.widths, shape.channels
        self.conv1 = nn.Conv2d(c, n1, kernel_size=k1, padding=k1 // 2)
        self.conv2 = nn.Conv2d(n1, n2, kernel_size=k2, padding=k2 // 2)
        self.conv3 = nn.Conv2d(n2, c, kernel_size=k3, padding=k3 // 2)
        self.last_layer_by_phase = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ReLU in place: a convolution's backward needs its input, not its output, so nothing autograd
        # saved is overwritten; the same values, and no fresh buffer (the CPU step the faster for it)
        x = torch.relu_(self.conv1(x))
        x = torch.relu_(self.conv2(x))
        return conv_by_phase(x, self.conv3) if self.last_layer_by_phase else self.conv3(x)


PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, column) in each 2x2 block of output pixels


def phase_weights(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a stride-2 convolution, one tap wider, that gives the k x k convolution of
    `weight` and `bias` (padded p = k // 2) in 2x2 blocks: with its grid starting p pixels before
    the image (padded p before and p + 1 after, or p both ways on an even side), output pixel
    (2y + a, 2x + b) of channel c is channel 4c + 2a + b at (y, x), its weights the k x k ones
    shifted by (a, b) among zeros, so every sum is the original one. (A grid starting one pixel
    earlier gives pixel (2y + a - 1, 2x + b - 1) there: _ByPhase's way on an odd side.)

    Why: CPU convolutions (oneDNN in PyTorch, ONNX Runtime) compute output channels in blocks of 8
    or 16, so the last layer's 3 cost as much as 16; as 12 channels over a quarter of the positions
    with 36 taps instead of 25 they cost 16 * 36 / 4 against 16 * 25 per pixel (docs/speed.md)."""
    out_channels, in_channels, k, _ = weight.shape
    shifted = [F.pad(weight, (b, 1 - b, a, 1 - a)) for a, b in PHASES]
    return (torch.stack(shifted, dim=1).reshape(4 * out_channels, in_channels, k + 1, k + 1),
            bias.repeat_interleave(4))


def conv_by_phase(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """`conv(x)` (a k x k convolution padded k // 2, k odd) computed by phase_weights' stride-2
    convolution, its 2x2 blocks put in place by pixel_shuffle, cropped to x's height and width; the
    gradients are those of conv's own weight and bias (_ByPhase)."""
    return _ByPhase.apply(x, conv.weight, conv.bias, conv.padding[0])


class _ByPhase(torch.autograd.Function):
    """conv_by_phase, with a backward that takes for each gradient the faster of the two ways, both
    the plain convolution's gradients: the weights' by phase, summed back from the shifted copies to
    the k x k weights (the plain way fills blocks of output channels with 3, as the forward does);
    the input's as the plain convolution's transpose, 3 channels in and 32 out, which fills no
    blocks (by phase its 12 channels in would): each way the faster where measured (docs/speed.md,
    "Where the step's time goes")."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: int) -> torch.Tensor:
        # the stride-2 grid starts p pixels before an even side and p + 1 before an odd one, so that
        # the convolution pads symmetrically by itself (no padded copy of x) and covers every pixel
        height, width = x.shape[-2:]
        odd_height, odd_width = height % 2, width % 2
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.odd = p, (odd_height, odd_width)
        blocks = F.conv2d(x, *phase_weights(weight, bias), stride=2, padding=(p + odd_height, p + odd_width))
        return F.pixel_shuffle(blocks, 2)[..., odd_height:odd_height + height, odd_width:odd_width + width]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        (odd_height, odd_width), p = ctx.odd, ctx.padding
        out_channels, in_channels, k, _ = weight.shape
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad, padding=p)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            blocks = F.pixel_unshuffle(F.pad(grad, (odd_width, 0, odd_height, 0)), 2)
            grad_shifted = torch.nn.grad.conv2d_weight(x, (4 * out_channels, in_channels, k + 1, k + 1), blocks,
                                                       stride=2, padding=(p + odd_height, p + odd_width))
            grad_shifted = grad_shifted.unflatten(0, (out_channels, 4))
            grad_weight = sum(grad_shifted[:, i, :, a:a + k, b:b + k] for i, (a, b) in enumerate(PHASES))
            grad_bias = blocks.sum((0, 2, 3)).unflatten(0, (out_channels, 4)).sum(1)
        return grad_x, grad_weight, grad_bias, None


@torch.no_grad()
def init_identity_(model: SRCNN, noise_std: float = 1e-3) -> None:
    """Start training at bicubic quality: as many channels as the input has carry it straight through.

    The input is non-negative, so the ReLUs pass it unchanged; every other weight stays at its
    default random value, scaled down so that the start is close to the identity mapping.
    """
    for conv in (model.conv1, model.conv2, model.conv3):
        conv.weight.mul_(noise_std / conv.weight.std())
        conv.bias.zero_()
    for c in range(model.shape.channels):
        for conv in (model.conv1, model.conv2):
            conv.weight[c].zero_()
            conv.weight[c, c, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1.0
        model.conv3.weight[:, c].zero_()
        model.conv3.weight[c, c, model.conv3.kernel_size[0] // 2, model.conv3.kernel_size[1] // 2] = 1.0
