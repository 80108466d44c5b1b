"""Hostile and broken inputs: checkpoints, images, downloads and paths. Each ends in a correct
result or one clear error line; never a traceback, never code run, never a bad file kept."""

import functools
import http.server
import shutil
import struct
import threading
import zipfile
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import assert_clean_error
from download import download, read_manifest
from model import SRCNN
from utils import UserError


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "weights.pth"
    torch.save({"model": SRCNN().state_dict(), "scale": 3}, path)
    return path


def noise_image(width, height, mode="RGB"):
    return Image.effect_noise((width, height), 80).convert("RGB").convert(mode)


# ---------------------------------------------------------------- checkpoints


def test_truncated_at_many_lengths(cli, weights, tmp_path):
    data = weights.read_bytes()
    lr = tmp_path / "lr.png"
    noise_image(8, 8).save(lr)
    for length in (0, 1, 64, 512, len(data) // 3, len(data) - 100, len(data) - 1):
        path = tmp_path / f"cut{length}.pth"
        path.write_bytes(data[:length])
        assert_clean_error(cli("super_resolve", "--checkpoint", str(path), str(lr)), path.name)
        assert_clean_error(cli("train", "inspect", str(path)), path.name)


def test_zip_with_a_missing_member(cli, weights, tmp_path):
    broken = tmp_path / "missing_member.pth"
    with zipfile.ZipFile(weights) as src, zipfile.ZipFile(broken, "w") as dst:
        members = src.namelist()
        dropped = next(name for name in members if "/data/" in name)
        for name in members:
            if name != dropped:
                dst.writestr(src.getinfo(name), src.read(name))
    lr = tmp_path / "lr.png"
    noise_image(8, 8).save(lr)
    assert_clean_error(cli("super_resolve", "--checkpoint", str(broken), str(lr)), "not a valid checkpoint")


def test_wrong_dtype_is_refused(cli, tmp_path):
    state = {k: v.to(torch.int64) for k, v in SRCNN().state_dict().items()}
    torch.save(state, tmp_path / "ints.pth")
    noise_image(8, 8).save(tmp_path / "lr.png")
    result = cli("super_resolve", "--checkpoint", str(tmp_path / "ints.pth"), str(tmp_path / "lr.png"))
    assert_clean_error(result, "floating-point")


def test_checkpoint_of_another_scale(cli, tmp_path):
    torch.save({"model": SRCNN().state_dict(), "scale": 2}, tmp_path / "x2.pth")
    noise_image(10, 7).save(tmp_path / "lr.png")
    args = ("--checkpoint", str(tmp_path / "x2.pth"), str(tmp_path / "lr.png"), "--output", str(tmp_path / "o.png"))
    assert_clean_error(cli("super_resolve", *args, "--scale", "3"), "x2", "--scale 3")
    assert cli("super_resolve", *args).returncode == 0
    assert Image.open(tmp_path / "o.png").size == (20, 14)  # the checkpoint's own scale


# ---------------------------------------------------------------- images


def super_resolve(cli, weights, path, tmp_path):  # into one path each time, replaced on purpose (hypothesis)
    return cli("super_resolve", "--checkpoint", str(weights), str(path), "--output", str(tmp_path / "out.png"),
               "--overwrite")


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".jpg"])
def test_truncated_images(cli, weights, tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    noise_image(64, 48).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_clean_error(super_resolve(cli, weights, path, tmp_path), path.name)
    assert not (tmp_path / "out.png").exists()


def test_zero_byte_file(cli, weights, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert_clean_error(super_resolve(cli, weights, tmp_path / "empty.png", tmp_path), "empty.png")


def png_header_only(width, height):
    """A PNG that claims width x height pixels: Pillow's decompression-bomb check sees it at once."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused(cli, weights, tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header_only(40000, 40000))
    assert_clean_error(super_resolve(cli, weights, tmp_path / "bomb.png", tmp_path), "decompression bomb")


@pytest.mark.parametrize(
    "size, mode, suffix, out_mode",
    [((1, 1), "RGB", ".png", "RGB"), ((2, 2), "RGB", ".bmp", "RGB"), ((9, 7), "I;16", ".png", "L"),
     ((9, 7), "P", ".png", "RGB"), ((9, 7), "CMYK", ".jpg", "RGB"), ((9, 7), "LA", ".png", "LA"),
     ((9, 7), "RGBA", ".png", "RGBA"), ((400, 1), "RGB", ".png", "RGB"), ((1, 300), "L", ".png", "L")],
)
def test_image_kinds(cli, weights, tmp_path, size, mode, suffix, out_mode):
    path = tmp_path / f"in{suffix}"
    noise_image(*size, mode if mode != "I;16" else "L").convert(mode).save(path)
    result = super_resolve(cli, weights, path, tmp_path)
    assert result.returncode == 0, result.stderr
    out = Image.open(tmp_path / "out.png")
    assert out.size == (size[0] * 3, size[1] * 3) and out.mode == out_mode


def test_exif_rotated_jpeg_is_taken_as_shown(cli, weights, tmp_path):
    image = noise_image(20, 10)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert super_resolve(cli, weights, tmp_path / "rotated.jpg", tmp_path).returncode == 0
    assert Image.open(tmp_path / "out.png").size == (30, 60)


def test_broken_image_in_a_training_set(cli, mini_root, tmp_path):
    shutil.copytree(mini_root / "T91", tmp_path / "T91")
    (tmp_path / "T91" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = cli("train", "train", "--data-root", str(tmp_path), "--eval-set", str(mini_root / "Set5"),
                 "--checkpoint-dir", str(tmp_path / "ck"))
    assert_clean_error(result, "broken.png")


settings.register_profile("suite", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("suite")


@given(data=st.binary(max_size=2000), header=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"BM", b"\xff\xd8\xff"]))
def test_random_bytes_never_crash(cli, weights, tmp_path, data, header):
    path = tmp_path / "random.png"
    path.write_bytes(header + data)
    result = super_resolve(cli, weights, path, tmp_path)
    if result.returncode == 0:
        out = Image.open(tmp_path / "out.png")
        assert out.size == tuple(3 * s for s in Image.open(path).size)
    else:
        assert_clean_error(result)


@given(
    width=st.integers(1, 40), height=st.integers(1, 40),
    mode=st.sampled_from(["1", "L", "P", "RGB", "RGBA", "LA", "I;16", "CMYK"]),
    suffix=st.sampled_from([".png", ".bmp", ".tif", ".webp", ".jpg", ".gif"]),
)
def test_random_images_give_the_right_size(cli, weights, tmp_path, width, height, mode, suffix):
    path = tmp_path / f"in{suffix}"
    try:
        noise_image(width, height, "L" if mode == "I;16" else mode).convert(mode).save(path)
    except (OSError, ValueError, KeyError):
        return  # this format cannot store this mode; nothing to test
    result = super_resolve(cli, weights, path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "out.png").size == (3 * width, 3 * height)


# ---------------------------------------------------------------- paths


def test_output_folder_is_created_and_input_is_never_overwritten(cli, weights, tmp_path):
    lr = tmp_path / "lr.png"
    noise_image(6, 5).save(lr)
    deep = tmp_path / "new" / "folder" / "sr.png"
    assert cli("super_resolve", "--checkpoint", str(weights), str(lr), "--output", str(deep)).returncode == 0
    assert Image.open(deep).size == (18, 15)
    original = lr.read_bytes()
    assert_clean_error(cli("super_resolve", "--checkpoint", str(weights), str(lr), "--output", str(lr)), "--overwrite")
    assert lr.read_bytes() == original
    result = cli("super_resolve", "--checkpoint", str(weights), str(lr), "--output", str(lr), "--overwrite")
    assert result.returncode == 0
    assert Image.open(lr).size == (18, 15)


# ---------------------------------------------------------------- downloads


class FaultyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, except for paths given a fault: 404, 500, loop, short, long, cut."""

    faults: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        fault = self.faults.get(self.path)
        if fault in (404, 500):
            self.send_error(fault)
        elif fault == "loop":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.end_headers()
        elif fault in ("short", "long", "cut"):
            body = open(self.translate_path(self.path), "rb").read()
            sent = {"short": body[:-10], "long": body + b"extra", "cut": body[: len(body) // 2]}[fault]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) if fault == "cut" else len(sent)))
            self.end_headers()
            self.wfile.write(sent)
            self.close_connection = True
        else:
            super().do_GET()


@pytest.fixture()
def faulty_server(real_data):
    handler = functools.partial(FaultyHandler, directory=str(real_data))
    FaultyHandler.faults = {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", FaultyHandler.faults
    server.shutdown()


@pytest.mark.parametrize(
    "fault, message",
    [(404, "HTTP 404"), (500, "HTTP 500"), ("loop", "HTTP 302"), ("short", "expected"), ("long", "expected"),
     ("cut", "was not kept")],
)
def test_download_faults_keep_no_bad_file_and_a_rerun_resumes(faulty_server, tmp_path, fault, message):
    url, faults = faulty_server
    faults["/Set5/butterfly.png"] = fault
    with pytest.raises(UserError, match=message):
        download(tmp_path, ["Set5"], url)
    folder = tmp_path / "Set5"
    assert not (folder / "butterfly.png").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left behind
    fetched_before = {p.name for p in folder.iterdir()}
    faults.clear()
    expected = {row["file"] for row in read_manifest() if row["dataset"] == "Set5"}
    assert download(tmp_path, ["Set5"], url) == len(expected - fetched_before)  # verified files are skipped
    assert {p.name for p in folder.iterdir()} == expected
