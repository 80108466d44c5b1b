"""Super-resolve image files with a trained SRCNN: the command line around inference.py and onnx_engine.py.

    python super_resolve.py --checkpoint checkpoint.pth lr.bmp [--output out.png] [--gt hr.png]
"""

import argparse
import glob
import re
import sys
from collections import Counter
from pathlib import Path

import interrupts  # noqa: F401  (first: Ctrl-C while torch loads ends in one line)

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import info
from checkpoint import MODEL_HELP, SHIPPED_NETWORKS, chosen_checkpoint, load_model
from data import (
    DEGRADATIONS,
    IMAGE_SUFFIXES,
    frame_count,
    image_format,
    image_to_tensor,
    load_image,
    modcrop,
    save_image,
    split_modes,
    upscale,
)
from inference import Network, super_resolve_image
from metrics import psnr, ssim
from model import ASSIGNMENT, Shape
from onnx_engine import ENGINES, engine_for, export_onnx
from utils import HelpFormatter, UserError, choose_device, run_cli


def model_tag(shape: Shape) -> str:
    """What output names add for a network other than the assignment's: its filter sizes, Y and widths
    (photo_srcnn955y_x3.png), so that the quick start's two models leave two results."""
    if shape == ASSIGNMENT:
        return ""
    widths = "" if shape.widths == ASSIGNMENT.widths else f"w{shape.widths[0]}-{shape.widths[1]}"
    return shape.name.replace("-", "") + ("y" if shape.channels == 1 else "") + widths


def output_path(input_path: Path, output: str | None, name: str, many: bool) -> Path:
    if output is None:
        return input_path.with_name(name)
    out = Path(output)
    if many or out.is_dir() or output.endswith(("/", "\\")):
        return out / name
    return out


def output_paths(files: list[Path], output: str | None, tag: str, scale: int, many: bool) -> list[Path]:
    """Where each input's result goes: <stem>_srcnn<tag>_x<scale>.png beside it or in --output's folder;
    inputs whose names differ only by their suffix (x.tiff, x.webp) keep it (x_tiff_srcnn_x3.png).
    Two results never go to one path: any left refused in one line, before any work."""
    def named(path: Path, stem: str) -> Path:
        return output_path(path, output, f"{stem}_srcnn{tag}_x{scale}.png", many)

    dests = [named(path, path.stem) for path in files]
    counts = Counter(dests)
    dests = [named(path, path.stem + "_" + path.suffix.lstrip(".")) if counts[dest] > 1 else dest
             for path, dest in zip(files, dests, strict=True)]
    for dest, count in Counter(dests).items():
        if count > 1:
            sources = [str(path) for path, d in zip(files, dests, strict=True) if d == dest]
            raise UserError(f"{' and '.join(sources[:2])} would both be written to {dest}; run them separately "
                            "or give each its own --output")
    return dests


def is_our_output(path: Path) -> bool:
    """Named as this tool names its outputs (<stem>_srcnn[tag]_x<scale>.<ext>)."""
    return re.search(r"_srcnn[0-9a-z-]*_x\d+$", path.stem) is not None


def expand_inputs(names: list[str]) -> list[Path]:
    """Files, folders (the images in them) and glob patterns, in order, each file once. Earlier
    outputs of this tool found in folders and globs are left out (said once): a second run on a
    folder must not upscale the first run's results. A file named outright is always taken."""
    paths: list[Path] = []
    skipped: list[Path] = []
    for name in names:
        path = Path(name)
        if path.is_dir():
            found = [p for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        elif not path.exists() and any(c in name for c in "*?["):
            found = [Path(p) for p in sorted(glob.glob(name)) if Path(p).is_file()]
        else:
            paths.append(path)
            continue
        skipped += [p for p in found if is_our_output(p)]
        paths += [p for p in found if not is_our_output(p)]
    if skipped:
        print(f"note: skipping {len(skipped)} earlier output(s) of this tool (named *_srcnn_x<scale>), "
              f"e.g. {skipped[0]}", file=sys.stderr)
    if not paths:
        raise UserError(f"no images found in {' '.join(names)}")
    return list(dict.fromkeys(paths))


def parse_crop(text: str) -> tuple[int, int, int, int]:
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected x,y,w,h (four integers)") from None
    if w < 1 or h < 1 or x < 0 or y < 0:
        raise argparse.ArgumentTypeError("x, y must be >= 0 and w, h >= 1")
    return x, y, w, h


def compare_picture(panels: list[tuple[str, Image.Image]], crop: tuple[int, int, int, int] | None) -> Image.Image:
    """Captioned images side by side; with `crop` (x, y, w, h), that region of each, enlarged."""
    if crop:
        x, y, w, h = crop
        zoom = max(1, round(320 / max(w, h)))
        panels = [(t, im.crop((x, y, x + w, y + h)).resize((w * zoom, h * zoom), Image.Resampling.NEAREST))
                  for t, im in panels]
    gap, caption = 8, 28
    width, height = panels[0][1].size
    canvas = Image.new("RGB", (len(panels) * (width + gap) - gap, height + caption), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=15)
    for i, (title, image) in enumerate(panels):
        left = i * (width + gap)
        canvas.paste(image.convert("RGB"), (left, caption))
        draw.text((left + width / 2, caption / 2), title, fill="black", font=font, anchor="mm")
    return canvas


def check_crop(crop: tuple[int, int, int, int], size: tuple[int, int]) -> None:
    x, y, w, h = crop
    if x + w > size[0] or y + h > size[1]:
        raise UserError(f"--crop {x},{y},{w},{h} lies outside the {size[0]}x{size[1]} output")


def load_ground_truth(path: str, size: tuple[int, int], scale: int) -> Image.Image:
    """The HR image cropped to a multiple of `scale`, as an input is made from it; it must then be
    the output's size, so up to scale - 1 extra pixels at the right and bottom are accepted."""
    gt = load_image(path)
    hr = modcrop(split_modes(gt)[0], scale)
    if hr.size != size:
        raise UserError(
            f"--gt is {gt.width}x{gt.height}; expected {size[0]}x{size[1]} (the input x{scale}), "
            f"or up to {scale - 1} pixels wider and higher (cropped off, as when the input was made)"
        )
    return hr


def check_outputs(pairs: list[tuple[Path, Path]], compare: str | None, overwrite: bool) -> None:
    """Every path this run writes (each input's result, --compare's picture), refused in one line before
    the first image is read: an existing file (unless `overwrite`; an input image is named as such), a
    folder that cannot be written, a suffix that names no image format."""
    outputs = [(dest, "output", source) for source, dest in pairs]
    outputs += [(Path(compare), "comparison", None)] if compare else []
    for path, role, source in outputs:
        if path.exists() and not overwrite:  # not this run's: each of its results has a path of its own
            if source is not None and path.resolve() == source.resolve():
                raise UserError(f"output {path} is the input image; pass --overwrite to replace it")
            raise UserError(f"{role} {path} exists already; pass --overwrite to replace it, or choose another path")
        image_format(path, role)


def existing_results(files: list[Path], dests: list[Path]) -> list[tuple[Path, Path]]:
    """The (input, result) pairs of a run on several images whose result exists already (an input that
    is its own result is not one)."""
    return [(source, dest) for source, dest in zip(files, dests, strict=True)
            if dest.exists() and dest.resolve() != source.resolve()]


def super_resolve_file(network: Network, source: Path, dest: Path, scale: int, args: argparse.Namespace) -> None:
    """Upscale one file (its output paths checked before, check_outputs); every argument that depends
    on the image is checked before any work."""
    lr = load_image(source)
    if (frames := frame_count(source)) > 1:
        print(f"note: {source} holds {frames} frames; upscaling the first", file=sys.stderr)
    size = (lr.width * scale, lr.height * scale)
    hr = load_ground_truth(args.gt, size, scale) if args.gt else None
    if args.crop:
        check_crop(args.crop, size)
    sr = super_resolve_image(network, lr, scale, args.self_ensemble, args.degradation)
    save_image(sr, dest)
    print(f"{source} -> {dest} ({lr.width}x{lr.height} -> {sr.width}x{sr.height})")
    if not (args.gt or args.compare):
        return
    panels = [("bicubic", upscale(split_modes(lr)[0], scale, args.degradation)), ("SRCNN", split_modes(sr)[0])]
    if hr is not None:
        hr_t = image_to_tensor(hr)
        for i, (label, image) in enumerate(panels):
            image_t = image_to_tensor(image)
            p, s = psnr(image_t, hr_t, shave=scale), ssim(image_t, hr_t, shave=scale)
            print(f"{label:8s} PSNR {p:.2f} dB  SSIM {s:.4f}")
            panels[i] = (f"{label}  {p:.2f} dB / {s:.4f}", image)
        panels.append(("ground truth", hr))
    if args.compare:
        save_image(compare_picture(panels, args.crop), Path(args.compare))
        print(f"comparison written to {args.compare}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Super-resolve images with a trained SRCNN checkpoint.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="low-resolution image(s), folder(s) or glob(s)")
    parser.add_argument("--checkpoint", help="one of our checkpoints, or a bare SRCNN state_dict (default: the "
                        "model shipped for --model and --scale: checkpoint.pth for x3, models/srcnn_x2.pth, "
                        "models/srcnn_x4.pth, ...)")
    parser.add_argument("--model", choices=SHIPPED_NETWORKS, help=MODEL_HELP)
    parser.add_argument("--output", help="output file, or folder for several inputs "
                        "(default: <stem>_srcnn_x<scale>.png beside each input; another network than the "
                        "assignment's adds its name, e.g. <stem>_srcnn955y_x3.png)")
    parser.add_argument("--gt", metavar="HR",
                        help="high-resolution ground truth: print PSNR/SSIM of SRCNN and bicubic (default: none)")
    parser.add_argument("--compare", metavar="PATH",
                        help="write bicubic | SRCNN | ground truth side by side (default: no picture)")
    parser.add_argument("--crop", type=parse_crop, metavar="X,Y,W,H",
                        help="with --compare: show this region enlarged (default: the whole image)")
    parser.add_argument("--self-ensemble", action="store_true", help="average the 8 flips/rotations (slower)")
    parser.add_argument("--degradation", choices=DEGRADATIONS, default="pil",
                        help="the bicubic upscale before the network: Pillow's, or MATLAB's imresize")
    parser.add_argument("--scale", type=int, help="upscaling factor: without --checkpoint it picks the shipped "
                        "model, with one it must agree (default: the checkpoint's, or 3)")
    parser.add_argument("--overwrite", action="store_true", help="let outputs replace files that exist, an input "
                        "included (default: such an image is refused and left as it is)")
    parser.add_argument("--skip-existing", action="store_true", help="of several inputs, leave out those whose "
                        "result exists (a folder run again); default: refused before any work, unless --overwrite")
    parser.add_argument("--cuda", action="store_true", help="run on the GPU")
    parser.add_argument("--engine", choices=ENGINES, default="auto", help="what runs the network: auto is ONNX "
                        "Runtime (1.21 or later) on the CPU when installed (the faster, docs/speed.md), else PyTorch")
    parser.add_argument("--export", metavar="MODEL.onnx",
                        help="write the network as ONNX (dynamic height and width) instead (default: none)")
    parser.add_argument("--version", action="version", version=info.version_string())
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    checkpoint = chosen_checkpoint(args.checkpoint, args.scale, args.model,
                                   "pass --checkpoint CKPT trained at that scale")
    if args.export:
        export_onnx(load_model(checkpoint, choose_device(False), args.scale)[0], Path(args.export))
        print(f"ONNX model written to {args.export}")
        return 0
    if not args.inputs:
        parser.error("the following arguments are required: INPUT (or --export)")
    files = expand_inputs(args.inputs)
    many = len(files) > 1 or any(Path(name).is_dir() for name in args.inputs)
    if many and (args.gt or args.compare):
        raise UserError("--gt and --compare need exactly one input image")
    if args.crop and not args.compare:
        raise UserError("--crop needs --compare")

    device = choose_device(args.cuda)
    model, scale, _ = load_model(checkpoint, device, args.scale)
    network = engine_for(model, args.engine)
    pairs = list(zip(files, output_paths(files, args.output, model_tag(model.shape), scale, many), strict=True))
    existing = existing_results(files, [dest for _, dest in pairs]) if many and not args.overwrite else []
    if existing and not args.skip_existing:
        raise UserError(f"{len(existing)} of the {len(pairs)} results exist already, e.g. {existing[0][1]}; pass "
                        "--skip-existing to upscale only the others, or --overwrite to replace them")
    pairs = [pair for pair in pairs if pair not in existing]
    check_outputs(pairs, args.compare, args.overwrite)
    if not many:
        super_resolve_file(network, *pairs[0], scale, args)
        return 0
    failed = 0
    for source, dest in tqdm(pairs, desc="super-resolve", unit="image", file=sys.stderr):
        try:
            super_resolve_file(network, source, dest, scale, args)
        except UserError as err:
            failed += 1
            tqdm.write(f"warning: skipped {source}: {err}", file=sys.stderr)
    skipped = f", {len(existing)} skipped (their results exist)" if existing else ""
    print(f"{len(pairs) - failed} image(s) written, {failed} failed{skipped}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
