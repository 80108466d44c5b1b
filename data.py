"""Images: reading them from disk and writing them, as tensors, the degradation (bicubic down
and up), the evaluation pairs and the training patches.

Run `python data.py download` to fetch the data sets listed in datasets.tsv (download.py).
"""

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import interrupts  # noqa: F401  (first: Ctrl-C while torch loads ends in one line)

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from download import known_sets
from files import atomic_write, cannot_write, check_writable
from utils import UserError, run_cli

if TYPE_CHECKING:
    from processes import Processes

IMAGE_SUFFIXES = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"}
PNG_COMPRESS_LEVEL = 3  # zlib level of written PNGs: a third of the default's time, files as small (docs/speed.md)


# ---------------------------------------------------------------- images


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image, turned upright as a viewer shows it (EXIF orientation)."""
    return read_image(path, decode=True)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding it (up to EXIF rotation,
    which swaps the two)."""
    return read_image(path, decode=False).size


def read_image(path: str | Path, decode: bool) -> Image.Image:
    """An image file decoded and turned upright, or (not `decode`) only its header read; a file
    Pillow cannot read ends in one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            if not decode:
                getattr(image, "n_frames", 1)  # counted while the file is open (a GIF's frames are sought)
                return image
            image.load()
            return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as err:
        raise UserError(f"{path}: image too large, refused as a possible decompression bomb ({err})") from None
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: broken image file ({err})") from None


def load_rgb(path: str | Path) -> Image.Image:
    """An image as 8-bit RGB: what training and evaluation work on."""
    return split_modes(load_image(path))[0]


def split_modes(image: Image.Image) -> tuple[Image.Image, Image.Image | None, bool]:
    """(8-bit RGB colour, alpha or None, was grayscale) for any image Pillow reads."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        image = to_8bit_gray(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") else None
    gray = image.mode in ("L", "LA", "La", "1")
    return image.convert("RGB"), alpha, gray


def to_8bit_gray(image: Image.Image) -> Image.Image:
    """Integer or float grayscale (16-bit PNG and the like) scaled down to 8 bits."""
    array = np.asarray(image, dtype=np.float64)
    peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
    return Image.fromarray(np.clip(np.round(array / peak * 255), 0, 255).astype(np.uint8))


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


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma as MATLAB's rgb2ycbcr: RGB in [0, 255] -> Y in [16, 235], channel dim -3."""
    r, g, b = x.unbind(-3)
    return 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0


# RGB per unit of that luma at constant Cb and Cr: MATLAB's ycbcr2rgb maps a change dY of Y (in
# [16, 235]) to the same change 255 / 219 * dY of R, G and B, as Cb and Cr weigh R, G, B summing to 0
RGB_PER_LUMA = 255 / 219


def with_luma(rgb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] whose luma (rgb_to_y / 255) is `y` and whose Cb and Cr are those of `rgb`:
    how a Y-channel network's output becomes a colour picture."""
    return rgb + (y - rgb_to_y(rgb * 255).unsqueeze(-3) / 255) * RGB_PER_LUMA


def image_format(path: Path, role: str = "image") -> str:
    """The Pillow format an image written to `path` takes from its suffix; a path that could not be
    written, or whose suffix names no format, refused in one line (before any work, where it is called)."""
    check_writable(path, role)
    name = Image.registered_extensions().get(path.suffix.lower())
    if name is None:
        raise cannot_write(path, f"unknown image file extension {path.suffix!r} (e.g. .png, .jpg, .bmp, .tif)", role)
    return name


def frame_count(path: str | Path) -> int:
    """The frames an image file holds (an animated GIF or a multi-page TIFF several), from its header."""
    return getattr(read_image(path, decode=False), "n_frames", 1)


def save_image(image: Image.Image, path: Path) -> None:
    """Write an image with Pillow in the format its suffix names (PNG at PNG_COMPRESS_LEVEL)."""
    suffix, name = path.suffix.lower(), image_format(path)
    if suffix in (".jpg", ".jpeg") and image.mode in ("RGBA", "LA"):
        image = image.convert(image.mode[:-1])
    with atomic_write(path) as f:
        try:
            image.save(f, format=name, **({"compress_level": PNG_COMPRESS_LEVEL} if suffix == ".png" else {}))
        except (ValueError, KeyError) as err:
            raise cannot_write(path, err) from None



# ---------------------------------------------------------------- the degradation


DEGRADATIONS = ("pil", "matlab")  # how the bicubic resizes are made: Pillow's, or MATLAB's imresize


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5, as MATLAB's imresize uses."""
    x = np.abs(x)
    return ((1.5 * x**3 - 2.5 * x**2 + 1) * (x <= 1)
            + (-0.5 * x**3 + 2.5 * x**2 - 4 * x + 2) * ((x > 1) & (x <= 2)))


def matlab_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(weights, input indices), both out_size x taps, of MATLAB's bicubic imresize along one axis:
    the kernel widened by the scale when shrinking (antialiasing), mirrored indices at the borders."""
    scale = out_size / in_size
    width = 4.0 / scale if scale < 1 else 4.0
    centre = np.arange(1, out_size + 1) / scale + 0.5 * (1 - 1 / scale)  # in MATLAB's 1-based coordinates
    first = np.floor(centre - width / 2)
    indices = first[:, None] + np.arange(int(np.ceil(width)) + 2)[None, :]
    distance = centre[:, None] - indices
    weights = scale * cubic(distance * scale) if scale < 1 else cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_size), np.arange(in_size - 1, -1, -1)])  # symmetric padding
    indices = mirror[np.mod(indices - 1, 2 * in_size).astype(np.int64)]
    used = np.any(weights != 0, axis=0)
    return weights[:, used], indices[:, used]


def matlab_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """MATLAB's imresize(image, [h w], 'bicubic') on an 8-bit image: rows first, then columns, in
    float64, rounded (half away from zero, as MATLAB) to 8 bits at the end."""
    x = np.asarray(image, dtype=np.float64)
    for axis, out_size in ((0, size[1]), (1, size[0])):
        weights, indices = matlab_weights(x.shape[axis], out_size)
        x = np.moveaxis(np.einsum("ot,ot...->o...", weights, np.moveaxis(x, axis, 0)[indices]), 0, axis)
    return Image.fromarray(np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8), image.mode)


def resize(image: Image.Image, size: tuple[int, int], degradation: str) -> Image.Image:
    """Bicubic resize to `size` (width, height), Pillow's or MATLAB's."""
    if degradation == "matlab":
        return matlab_resize(image, size)
    return image.resize(size, Image.Resampling.BICUBIC)


def modcrop(image: Image.Image, scale: int) -> Image.Image:
    """Crop (never resize) so that both sides are multiples of `scale`."""
    width, height = image.size
    return image.crop((0, 0, width - width % scale, height - height % scale))


def downscale(hr: Image.Image, scale: int, degradation: str = "pil") -> Image.Image:
    """The low-resolution image: modcrop, then bicubic down by `scale`."""
    hr = modcrop(hr, scale)
    return resize(hr, (hr.width // scale, hr.height // scale), degradation)


def upscale(lr: Image.Image, scale: int, degradation: str = "pil") -> Image.Image:
    """The network's input: bicubic up by `scale`."""
    return resize(lr, (lr.width * scale, lr.height * scale), degradation)


def degrade(hr: Image.Image, scale: int, degradation: str = "pil") -> tuple[Image.Image, Image.Image]:
    """(bicubic input, modcropped HR): the one pair every part of the project trains and tests on,
    made with Pillow's bicubic or MATLAB's (the field's tables)."""
    if min(hr.size) < scale:
        raise UserError(f"image of {hr.width}x{hr.height} is too small for x{scale}")
    return upscale(downscale(hr, scale, degradation), scale, degradation), modcrop(hr, scale)


# ---------------------------------------------------------------- data sets


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"data set folder not found: {folder} ({fix_hint(folder)})")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise UserError(f"no images in {folder} ({fix_hint(folder)})")
    return images


def shared_images(folders: Sequence[Path], other: Path) -> list[Path]:
    """The images of `folders` whose bytes are also an image of `other` (training on the evaluation
    set, say); only files of the size of one of `other`'s are read."""
    if not other.is_dir():
        return []

    def digest(path: Path) -> tuple[int, bytes]:
        return path.stat().st_size, hashlib.sha256(path.read_bytes()).digest()

    theirs = {digest(path) for path in list_images(other)}
    sizes = {size for size, _ in theirs}
    return [path for folder in folders for path in list_images(folder)
            if path.stat().st_size in sizes and digest(path) in theirs]


def fix_hint(folder: Path) -> str:
    """The command that fills `folder`, written to work from the current folder."""
    name = folder.name
    if name in known_sets():
        script = Path(__file__).resolve()
        shown = script.name if script.parent == Path.cwd().resolve() else str(script)
        return f"fix: python {shown} download --root {folder.parent} --sets {name}"
    return "fix: put images in it, or pass --data-root DIR with one folder per set (T91/, Set5/, ...)"


def shrunk_size(size: tuple[int, int], zoom: float) -> tuple[int, int]:
    return size if zoom == 1 else (max(1, round(size[0] * zoom)), max(1, round(size[1] * zoom)))


def shrink(image: Image.Image, zoom: float) -> Image.Image:
    """Pillow bicubic resize by `zoom` <= 1: the same scene with denser detail per pixel."""
    if zoom == 1:
        return image
    return image.resize(shrunk_size(image.size, zoom), Image.Resampling.BICUBIC)


class ImagePairs:
    """(name, bicubic input, HR) of every image of a folder and every zoom of it, as uint8 3 x H x W
    tensors, each image read and degraded when the iteration reaches it: one image in memory at a
    time. Made from the file names and headers alone, so a missing or empty folder, or a file
    whose header Pillow cannot read, ends in one line before any work."""

    def __init__(self, folder: str | Path, scale: int, zooms: Sequence[float] = (1.0,),
                 degradation: str = "pil") -> None:
        self.scale, self.zooms, self.degradation = scale, tuple(zooms), degradation
        self.paths = list_images(folder)
        self.count = sum(min(shrunk_size(image_size(path), zoom)) >= scale for path in self.paths for zoom in zooms)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        for path in self.paths:
            image = load_rgb(path)
            for zoom in self.zooms:
                shrunk = shrink(image, zoom)
                if min(shrunk.size) < self.scale:  # too small to be made smaller by the scale
                    continue
                lr_up, hr = degrade(shrunk, self.scale, self.degradation)
                name = path.stem if zoom == 1 else f"{path.stem}@{zoom:g}"
                yield name, image_to_tensor(lr_up), image_to_tensor(hr)


def load_pairs(folder: str | Path, scale: int, zooms: Sequence[float] = (1.0,),
               degradation: str = "pil") -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Every pair of ImagePairs at once, in memory: what the training patches are cut from."""
    return list(ImagePairs(folder, scale, zooms, degradation))


def training_images(folders: Sequence[Path], scale: int,
                    zooms: Sequence[float] = (1.0,)) -> list[tuple[Path, float, tuple[int, int]]]:
    """(file, zoom, (width, height) after the zoom and modcrop) of every training image at every zoom,
    from the image files' headers alone."""
    images = []
    for path in (path for folder in folders for path in list_images(folder)):
        for zoom in zooms:
            width, height = shrunk_size(image_size(path), zoom)
            images.append((path, zoom, (width - width % scale, height - height % scale)))
    return images


def held_bytes(folders: Sequence[Path], scale: int, zooms: Sequence[float] = (1.0,), kinds: int = 1) -> int:
    """The bytes TrainingPatches holds of these folders: each image's target and its input of each
    degradation kind, at every zoom, as 8-bit RGB."""
    return sum(3 * width * height * (1 + kinds) for _, _, (width, height) in training_images(folders, scale, zooms))


def rows_of(buffer: torch.Tensor, length: int) -> torch.Tensor:
    """Every run of `length` consecutive pixels of a (pixels, C) buffer, as a view: run k is
    buffer[k : k + length]. Indexing it gathers whole patch rows, not one pixel at a time."""
    return buffer.as_strided((len(buffer) - length + 1, length, buffer.shape[1]), (buffer.shape[1], buffer.shape[1], 1))


class TrainingPatches:
    """The (input, target) patch pairs of one or more folders: their images held in memory on the training device
    as uint8, and this epoch's grid of patch positions in them. A batch's patches are cut from the
    images when it is drawn (`take`), so memory is that of the images, not of their overlapping
    patches (T91 at the x3 recipe's five zooms: 27,243 patches of 48x48 would take 377 MB).

    Patch i is the i-th of the grids of all images, image by image, each grid row by row. Every
    epoch may move the grid inside each image (fresh crops; offset 0 is the assignment's fixed
    grid). `zooms` adds shrunk copies of every image: more varied training detail from the same 91
    images. `degradation` "mixed" keeps each image's input made both ways (Pillow, MATLAB) and draws
    one of the two per image every epoch.
    """

    def __init__(
        self,
        folders: Sequence[Path],
        scale: int,
        patch_size: int,
        stride: int,
        zooms: Sequence[float] = (1.0,),
        device: torch.device | str = "cpu",
        degradation: str = "pil",
    ) -> None:
        kinds = DEGRADATIONS if degradation == "mixed" else (degradation,)
        made = [[pair for folder in folders for pair in load_pairs(folder, scale, zooms, kind)] for kind in kinds]
        if not any(min(x.shape[1:]) >= patch_size for _, x, _ in made[0]):
            raise UserError(f"every training image in {', '.join(map(str, folders))} is smaller than the patch "
                            f"size {patch_size}")
        self.hold(made, patch_size, stride, device)

    @classmethod
    def of_pairs(cls, made: list[list], patch_size: int, stride: int, device: torch.device | str) -> "TrainingPatches":
        """The patches of pairs already read: made[k] the (name, input, target) pairs of degradation kind k."""
        patches = cls.__new__(cls)
        patches.hold(made, patch_size, stride, device)
        return patches

    def hold(self, made: list[list], patch_size: int, stride: int, device: torch.device | str) -> None:
        """Keep the images of the pairs that hold a patch, on `device`, and lay the grid at offset 0."""
        kept = [i for i, (_, x, _) in enumerate(made[0]) if min(x.shape[1:]) >= patch_size]  # the rest hold none
        self.patch_size, self.stride, self.kinds = patch_size, stride, len(made)
        self.sizes = [tuple(made[0][i][2].shape[1:]) for i in kept]  # (height, width) of each image
        pixels = torch.tensor([h * w for h, w in self.sizes])
        self.starts = (torch.cumsum(pixels, 0) - pixels).tolist()  # where each image begins in the buffers
        self.pixels = int(pixels.sum())

        def flat(tensors: list[torch.Tensor]) -> torch.Tensor:  # C x H x W images as one (pixels, C) buffer
            buffer = torch.cat([t.permute(1, 2, 0).reshape(-1, t.shape[0]) for t in tensors])
            if torch.device(device).type == "cuda":  # page-locked: copied by the GPU's engine, without waiting here
                buffer = buffer.pin_memory()
            return buffer.to(device, non_blocking=True)

        self.inputs = flat([pairs[i][1] for pairs in made for i in kept])  # each kind's images in turn
        self.targets = flat([made[0][i][2] for i in kept])
        self.steps = torch.arange(patch_size, device=device)
        self.place(0, None)

    def place(self, offset: int, kinds: list[int] | None) -> None:
        """Lay the grid at `offset` in each image (in none smaller than the patch plus the offset),
        each image's input taken of kind kinds[i]: every patch's top-left pixel in the buffers and
        its image's width."""
        p, s = self.patch_size, self.stride
        corners, widths, shifts = [], [], []
        for i, ((height, width), start) in enumerate(zip(self.sizes, self.starts, strict=True)):
            o = offset if min(height, width) >= p + offset else 0
            tops, lefts = torch.arange(o, height - p + 1, s), torch.arange(o, width - p + 1, s)
            corners.append(start + (tops[:, None] * width + lefts[None, :]).flatten())
            widths.append(torch.full((len(corners[-1]),), width))
            shifts.append(torch.full((len(corners[-1]),), (kinds[i] if kinds else 0) * self.pixels))
        device = self.steps.device
        self.corners, self.widths, self.shifts = (torch.cat(t).to(device) for t in (corners, widths, shifts))

    def new_epoch(self, generator: torch.Generator, move_grid: bool) -> None:
        """Draw this epoch's patches: the grid at a random offset in [0, stride) if `move_grid`, each
        image's degradation if mixed. Draws nothing, and keeps the patches, when neither applies."""
        offset = int(torch.randint(self.stride, (1,), generator=generator)) if move_grid else 0
        kinds = torch.randint(self.kinds, (len(self.sizes),), generator=generator).tolist() if self.kinds > 1 else None
        if move_grid or kinds:
            self.place(offset, kinds)

    def batches(self, batch_size: int, processes: "Processes", seed: int, epoch: int) -> list[torch.Tensor]:
        """This process's patch indices of every batch of the epoch: all patches in one shuffled order."""
        return processes.share(len(self), batch_size, seed, epoch)

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The patches at `index` (on the training device), as uint8 N x 3 x P x P (input, target),
        channels-last in memory: gathered from the images row by row, without a loop over patches."""
        corners, widths, shifts = (t[index].view(-1, 1) for t in (self.corners, self.widths, self.shifts))
        rows = corners + self.steps * widths  # N x P: where each of the patches' rows begins in the buffers
        return tuple(rows_of(buffer, self.patch_size)[at].permute(0, 3, 1, 2)
                     for buffer, at in ((self.inputs, rows + shifts), (self.targets, rows)))

    def __len__(self) -> int:
        return len(self.corners)


if __name__ == "__main__":  # `python data.py download`: the command line of download.py
    import download

    run_cli(download.main)
