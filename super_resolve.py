"""Super-resolve images with a trained SRCNN: the project's one inference path.

    python super_resolve.py --checkpoint checkpoint.pth lr.bmp [--output out.png] [--gt hr.png]
"""

import argparse
from pathlib import Path

import torch
from PIL import Image

import info
from data import degrade, load_image, to_8bit_gray, upscale
from model import SRCNN
from utils import UserError, choose_device, image_to_tensor, load_checkpoint, psnr, run_cli, ssim, tensor_to_image

RECEPTIVE_RADIUS = 6  # 9x9 then 1x1 then 5x5: an output pixel sees 6 pixels each way
DEFAULT_TILE = 512


# ---------------------------------------------------------------- the model from a checkpoint


def load_model(path: str | Path, device: torch.device) -> tuple[SRCNN, int, dict]:
    """(model in eval mode, scale, checkpoint) from one of our checkpoints or a bare state_dict."""
    checkpoint = load_checkpoint(path)
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict):
        raise UserError(f"{path}: 'model' entry is not a state_dict")
    model = SRCNN()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{path} is not an SRCNN checkpoint: missing keys {', '.join(missing)}")
    for key, tensor in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise UserError(f"{path}: '{key}' is not a floating-point tensor")
        if value.shape != tensor.shape:
            raise UserError(f"{path}: '{key}' has shape {tuple(value.shape)}, expected {tuple(tensor.shape)}")
    model.load_state_dict({k: state[k].float() for k in expected})
    scale = checkpoint.get("scale", 3)
    if not isinstance(scale, int) or scale < 2:
        raise UserError(f"{path}: invalid scale {scale!r}")
    return model.to(device).eval(), scale, checkpoint


# ---------------------------------------------------------------- the network on whole images


@torch.no_grad()
def run_tiled(model: SRCNN, x: torch.Tensor, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """The network on a 1 x 3 x H x W input, tile by tile with enough overlap to be exact."""
    _, _, height, width = x.shape
    if height <= tile and width <= tile:
        return model(x)
    out = torch.empty_like(x)
    r = RECEPTIVE_RADIUS
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            t0, l0 = max(top - r, 0), max(left - r, 0)
            patch = model(x[:, :, t0 : min(bottom + r, height), l0 : min(right + r, width)])
            out[:, :, top:bottom, left:right] = patch[:, :, top - t0 : bottom - t0, left - l0 : right - l0]
    return out


@torch.no_grad()
def enhance(model: SRCNN, x: torch.Tensor, self_ensemble: bool = False, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """SRCNN output in [0, 1] for a bicubic-upscaled 1 x 3 x H x W input in [0, 1].

    With `self_ensemble`, the mean over the 8 flips/rotations of the input (each undone).
    """
    if not self_ensemble:
        return run_tiled(model, x, tile).clamp_(0, 1)
    total = torch.zeros_like(x)
    for k in range(4):
        for flip in (False, True):
            t = x.flip(-1) if flip else x
            y = run_tiled(model, t.rot90(k, (-2, -1)), tile).rot90(-k, (-2, -1))
            total += y.flip(-1) if flip else y
    return total.div_(8).clamp_(0, 1)


def to_input(image_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 3 x H x W -> float 1 x 3 x H x W in [0, 1] on `device`."""
    return image_u8.to(device).float().div_(255).unsqueeze(0)


@torch.no_grad()
def evaluate(
    model: SRCNN | None, pairs: list, scale: int, device: torch.device, self_ensemble: bool = False
) -> dict:
    """Mean Y-PSNR and SSIM (border `scale` shaved) over (name, input, HR) pairs; None = bicubic."""
    psnrs, ssims = [], []
    for _, lr_up, hr in pairs:
        sr = lr_up if model is None else enhance(model, to_input(lr_up, device), self_ensemble)[0].cpu()
        psnrs.append(psnr(sr, hr, shave=scale))
        ssims.append(ssim(sr, hr, shave=scale))
    return {"psnr": sum(psnrs) / len(psnrs), "ssim": sum(ssims) / len(ssims)}


# ---------------------------------------------------------------- images of any mode


def split_modes(image: Image.Image) -> tuple[Image.Image, Image.Image | None, bool]:
    """(8-bit RGB colour, alpha or None, was grayscale) for any image Pillow reads."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        image = to_8bit_gray(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") else None
    gray = image.mode in ("L", "LA", "La", "1")
    return image.convert("RGB"), alpha, gray


def super_resolve_image(
    model: SRCNN, image: Image.Image, scale: int, device: torch.device, self_ensemble: bool = False
) -> Image.Image:
    """Upscale a low-resolution image of any mode by `scale`: bicubic, then SRCNN."""
    rgb, alpha, gray = split_modes(image)
    sr = enhance(model, to_input(image_to_tensor(upscale(rgb, scale)), device), self_ensemble)
    out = tensor_to_image(sr[0].cpu())
    if gray:
        out = out.convert("L")
    if alpha is not None:
        out.putalpha(upscale(alpha, scale))
    return out


def output_path(input_path: Path, output: str | None, scale: int, many: bool) -> Path:
    default_name = f"{input_path.stem}_srcnn_x{scale}.png"
    if output is None:
        return input_path.with_name(default_name)
    out = Path(output)
    if many or out.is_dir() or output.endswith(("/", "\\")):
        return out / default_name
    return out


def save_image(image: Image.Image, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".jpg", ".jpeg") and image.mode in ("RGBA", "LA"):
            image = image.convert(image.mode[:-1])
        image.save(path)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot write {path}: {getattr(err, 'strerror', None) or err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Super-resolve images with a trained SRCNN checkpoint.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="low-resolution image(s)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth, or a bare SRCNN state_dict")
    parser.add_argument("--output", help="output file, or folder (default: <stem>_srcnn_x<scale>.png beside input)")
    parser.add_argument("--gt", help="high-resolution ground truth: print PSNR/SSIM of SRCNN and bicubic")
    parser.add_argument("--self-ensemble", action="store_true", help="average the 8 flips/rotations (slower)")
    parser.add_argument("--cuda", action="store_true", help="run on the GPU")
    parser.add_argument("--version", action="version", version=info.version_string())
    args = parser.parse_args(argv)
    if args.gt and len(args.inputs) > 1:
        raise UserError("--gt needs exactly one input image")

    device = choose_device(args.cuda)
    model, scale, _ = load_model(args.checkpoint, device)
    for name in args.inputs:
        source = Path(name)
        lr = load_image(source)
        sr = super_resolve_image(model, lr, scale, device, args.self_ensemble)
        dest = output_path(source, args.output, scale, many=len(args.inputs) > 1)
        save_image(sr, dest)
        print(f"{source} -> {dest} ({lr.width}x{lr.height} -> {sr.width}x{sr.height})")
        if args.gt:
            report_against_gt(sr, lr, load_image(args.gt), scale)
    return 0


def report_against_gt(sr: Image.Image, lr: Image.Image, gt: Image.Image, scale: int) -> None:
    """PSNR/SSIM of SRCNN and of bicubic against the ground truth, on the modcropped HR."""
    hr = degrade(split_modes(gt)[0], scale)[1]
    if hr.size != sr.size:
        raise UserError(f"--gt is {gt.width}x{gt.height}; expected {sr.width}x{sr.height} (input x{scale})")
    hr_t = image_to_tensor(hr)
    bicubic = image_to_tensor(upscale(split_modes(lr)[0], scale))
    for label, image_t in (("bicubic", bicubic), ("srcnn", image_to_tensor(split_modes(sr)[0]))):
        print(f"{label:8s} PSNR {psnr(image_t, hr_t, shave=scale):.2f} dB  SSIM {ssim(image_t, hr_t, shave=scale):.4f}")


if __name__ == "__main__":
    run_cli(main)
