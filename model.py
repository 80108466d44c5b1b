"""The SRCNN network of the assignment: 9-1-5, 64/32 filters, RGB in and out."""

import torch
from torch import nn


class SRCNN(nn.Module):
    """Maps a bicubic-upscaled RGB image in [0, 1] to the high-resolution image, same size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=9, padding=4)
        self.conv2 = nn.Conv2d(64, 32, kernel_size=1)
        self.conv3 = nn.Conv2d(32, 3, kernel_size=5, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.conv3(x)


@torch.no_grad()
def init_identity_(model: SRCNN, noise_std: float = 1e-3) -> None:
    """Start training at bicubic quality: three channels carry the input straight through.

    The input is non-negative, so the ReLUs pass it unchanged; every other weight stays at its
    default random value, scaled down so that the start is close to the identity mapping.
    """
    for conv in (model.conv1, model.conv2, model.conv3):
        conv.weight.mul_(noise_std / conv.weight.std())
        conv.bias.zero_()
    for c in range(3):
        model.conv1.weight[c].zero_()
        model.conv1.weight[c, c, 4, 4] = 1.0
        model.conv2.weight[c].zero_()
        model.conv2.weight[c, c, 0, 0] = 1.0
        model.conv3.weight[:, c].zero_()
        model.conv3.weight[c, c, 2, 2] = 1.0
