"""Shared helpers: metrics, image/tensor conversion, checkpoint I/O, seeding, device, CLI errors and help."""

import argparse
import math
import os
import random
import re
import sys
import tempfile
import warnings
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


# ---------------------------------------------------------------- PNG files


PNG_BLOCK = 1 << 21  # bytes of scanlines compressed as one piece (one IDAT chunk), in parallel with the others


def png_filtered(rows: np.ndarray, previous: np.ndarray, channels: int) -> np.ndarray:
    """PNG's adaptive filtering, as libpng and Pillow do it: per scanline, of the five filters, the
    one whose output has the smallest sum of absolute values (as signed bytes). `rows`: uint8
    H x (W * C); `previous`: the scanline above the first row. Returns H x (1 + W * C), filter byte first."""
    x = rows.astype(np.int16)
    up = np.concatenate([previous[None].astype(np.int16), x[:-1]])
    left = np.zeros_like(x)
    left[:, channels:] = x[:, :-channels]
    upleft = np.zeros_like(x)
    upleft[:, channels:] = up[:, :-channels]
    estimate = left + up - upleft
    pa, pb, pc = np.abs(estimate - left), np.abs(estimate - up), np.abs(estimate - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    candidates = np.stack([x, x - left, x - up, x - (left + up) // 2, x - paeth]).astype(np.uint8)  # wraps mod 256
    cost = np.abs(candidates.view(np.int8).astype(np.int32)).sum(axis=2)  # 5 x H
    best = cost.argmin(axis=0)
    out = np.empty((len(rows), rows.shape[1] + 1), np.uint8)
    out[:, 0] = best
    out[:, 1:] = candidates[best, np.arange(len(rows))]
    return out


def write_png(image: Image.Image, path: str | Path, level: int = 6) -> None:
    """A standard 8-bit PNG of an L, LA, RGB or RGBA image, about as small as Pillow's at its default
    compression but compressed on every core: blocks of rows are filtered in turn and deflated each
    by its own thread, with the block before as dictionary (as pigz does), the pieces making one
    zlib stream. Blocks are written as they are done, so memory stays a few blocks whatever the size."""
    width, height = image.size
    channels = len(image.getbands())
    row_bytes = width * channels
    step = max(1, PNG_BLOCK // row_bytes)
    threads = os.cpu_count() or 1

    def deflate(block: bytes, dictionary: bytes | None, last: bool) -> bytes:
        # Pillow's settings: memLevel 9, Z_FILTERED; a raw stream, the zlib header and checksum are added once
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_FILTERED,
                                      **({"zdict": dictionary} if dictionary else {}))
        return compressor.compress(block) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]  # gray, gray + alpha, RGB, RGBA
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, colour_type, 0, 0, 0])
    checksum, previous_row, previous_block, pending = 1, np.zeros(row_bytes, np.uint8), b"", deque()
    with open(path, "wb") as f, ThreadPoolExecutor(threads) as pool:  # zlib lets go of the GIL as it compresses
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"\x78\x9c"))  # the zlib header
        for top in range(0, height, step):
            box = (0, top, width, min(top + step, height))
            rows = np.frombuffer(image.crop(box).tobytes(), np.uint8).reshape(-1, row_bytes)
            block = png_filtered(rows, previous_row, channels).tobytes()
            checksum = zlib.adler32(block, checksum)
            pending.append(pool.submit(deflate, block, previous_block[-32768:], box[3] == height))
            previous_row, previous_block = rows[-1], block
            while len(pending) > 2 * threads or (pending and pending[0].done()):
                f.write(chunk(b"IDAT", pending.popleft().result()))
        while pending:
            f.write(chunk(b"IDAT", pending.popleft().result()))
        f.write(chunk(b"IDAT", checksum.to_bytes(4, "big")) + chunk(b"IEND", b""))


def save_image(image: Image.Image, path: Path) -> None:
    """Write an image in the format its suffix names; PNGs of 8-bit images with write_png."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".jpg", ".jpeg") and image.mode in ("RGBA", "LA"):
            image = image.convert(image.mode[:-1])
        if path.suffix.lower() == ".png" and image.mode in ("L", "LA", "RGB", "RGBA"):
            write_png(image, path)
        else:
            image.save(path)
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


def writable_folder(folder: Path, role: str = "checkpoint folder") -> None:
    """Make `folder` if missing; refuse, in one line, one that cannot be written to."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {role} {folder}: {err.strerror or err}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"{role} {folder} is not writable")


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
