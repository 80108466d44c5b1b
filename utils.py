"""Shared helpers: metrics, image/tensor conversion, checkpoint I/O, seeding, device, CLI errors and help."""

import argparse
import contextlib
import math
import os
import random
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class UserError(Exception):
    """A problem the user can fix; the CLIs print it as one line, without a traceback."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI entry point: user errors become one line on stderr and exit code 2."""
    try:
        code = main() or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # output piped into a reader that stopped early, such as `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # one of several training processes: everything is saved, and Python's own teardown can
        # abort in gloo's threads (SIGABRT) instead of returning this exit code
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default; a flag whose default is None says in words what
    leaving it out means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


# ---------------------------------------------------------------- images and tensors


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An 8-bit PIL image (L or RGB) as a uint8 C x H x W tensor (a view of H x W x C memory)."""
    array = np.array(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to the 256 levels a saved 8-bit image has, as uint8."""
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """A 1- or 3-channel tensor in [0, 1] (or uint8) as an 8-bit PIL image."""
    if x.dtype != torch.uint8:
        x = quantize(x)
    array = x.permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


# ---------------------------------------------------------------- image files


PNG_COMPRESS_LEVEL = 3  # zlib level of written PNGs: a third of the default's time, files as small (docs/speed.md)


def save_image(image: Image.Image, path: Path) -> None:
    """Write an image with Pillow in the format its suffix names (PNG at PNG_COMPRESS_LEVEL)."""
    check_writable(path, "image")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".jpg", ".jpeg") and image.mode in ("RGBA", "LA"):
            image = image.convert(image.mode[:-1])
        image.save(path, **({"compress_level": PNG_COMPRESS_LEVEL} if path.suffix.lower() == ".png" else {}))
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot write {path}: {getattr(err, 'strerror', None) or err}") from None


# ---------------------------------------------------------------- metrics


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma as MATLAB's rgb2ycbcr: RGB in [0, 255] -> Y in [16, 235], channel dim -3."""
    r, g, b = x.unbind(-3)
    return 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def _metric_planes(sr: torch.Tensor, hr: torch.Tensor, shave: int, y_channel: bool) -> tuple:
    """Both images as float64 in [0, 255], 8-bit rounded, reduced to Y if asked, borders shaved."""
    if sr.shape != hr.shape:
        raise ValueError(f"shape mismatch: {tuple(sr.shape)} vs {tuple(hr.shape)}")
    planes = []
    for x in (sr, hr):
        x = (x if x.dtype == torch.uint8 else quantize(x)).double()
        if y_channel and x.shape[-3] == 3:
            x = rgb_to_y(x).unsqueeze(-3)
        if shave:
            x = x[..., shave:-shave, shave:-shave]
        planes.append(x)
    return tuple(planes)


def psnr(sr: torch.Tensor, hr: torch.Tensor, shave: int = 0, y_channel: bool = True) -> float:
    """PSNR in dB of one C x H x W image pair, on the 8-bit rounded output (BasicSR convention).

    Float inputs are taken to be in [0, 1]; uint8 inputs in [0, 255].
    """
    sr, hr = _metric_planes(sr, hr, shave, y_channel)
    mse = torch.mean((sr - hr) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(sr: torch.Tensor, hr: torch.Tensor, shave: int = 0, y_channel: bool = True) -> float:
    """SSIM of one C x H x W image pair: 11x11 Gaussian (sigma 1.5), valid region, as BasicSR."""
    sr, hr = _metric_planes(sr, hr, shave, y_channel)
    x, y = sr.unsqueeze(0), hr.unsqueeze(0)
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # the five local means, in one pass
    g = _gaussian_window()
    channels = stack.shape[1]
    blurred = F.conv2d(stack, g.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    blurred = F.conv2d(blurred, g.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)  # separable
    mu_x, mu_y, xx, yy, xy = blurred.chunk(5, dim=1)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean().item()


# ---------------------------------------------------------------- checkpoints


def check_writable(path: Path, role: str) -> None:
    """Refuse, in one line and before any work, a `role` at `path` (a file, or a folder to be made)
    that could not be written: the nearest existing part of the path is a file, or may not be written."""
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if existing != path and not existing.is_dir():
        raise UserError(f"cannot write {role} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise UserError(f"cannot write {role} {path}: {existing} is not writable")


def writable_folder(folder: Path, role: str = "checkpoint folder") -> None:
    """Make `folder` if missing; refuse, in one line, one that cannot be written to."""
    check_writable(folder, role)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{role} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {role} {folder}: {err.strerror or err}") from None


@contextlib.contextmanager
def removed_if_left_empty(folder: Path) -> Iterator[None]:
    """The folders on the way to `folder` that do not exist yet are removed again if the block
    fails and leaves them empty: a command that fails before its first save leaves nothing behind."""
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        yield
    except BaseException:
        for path in missing:  # the deepest first; rmdir removes only empty folders
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a partial file. Every
    tensor is written from the CPU, so the file loads on machines without the training device.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise UserError(f"cannot write checkpoint {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(to_cpu(checkpoint), f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise UserError(f"cannot write checkpoint {path}: {err.strerror or err}") from None
        raise


def to_cpu(value):
    """`value` with every tensor in it (in dicts, lists and tuples, at any depth) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(item) for item in value)
    return value


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint safely (tensors and primitives only; pickled code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then rejects
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise UserError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    except Exception as err:  # torch raises many types for broken files; classify by the message
        unsafe = re.search(r"(?:unsupported|Unsupported global:) GLOBAL (\S+)", str(err))
        if unsafe:
            raise UserError(
                f"{path} refused: it would load {unsafe.group(1)} (a pickle that can run code); "
                "checkpoints may hold only tensors and plain data"
            ) from None
        raise UserError(f"{path} is not a valid checkpoint (truncated or corrupt file)") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


# ---------------------------------------------------------------- reproducibility and devices


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_device(cuda: bool) -> torch.device:
    if not cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--cuda given but no CUDA device is available; run without --cuda to use the CPU")
    return torch.device("cuda")
