import pytest
import torch
from PIL import Image

from conftest import ROOT, assert_clean_error
from data import downscale
from model import SRCNN, Shape


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "weights.pth"
    torch.save(SRCNN().state_dict(), path)
    return path


def test_folders_and_globs_skip_broken_files_and_report(cli, weights, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, size in (("a.png", (5, 4)), ("b.bmp", (6, 6))):
        Image.effect_noise(size, 40).convert("RGB").save(folder / name)
    (folder / "c.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    result = cli("super_resolve", "--checkpoint", str(weights), str(folder), "--output", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "skipped" in result.stderr and "c.png" in result.stderr and "2 image(s) written, 1 failed" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_srcnn_x3.png", "b_srcnn_x3.png"]

    result = cli("super_resolve", "--checkpoint", str(weights), str(folder / "*.png"), str(folder / "b.bmp"),
                 "--output", str(tmp_path / "globbed"))
    assert result.returncode == 1 and "1 failed" in result.stderr
    assert Image.open(tmp_path / "globbed" / "a_srcnn_x3.png").size == (15, 12)

    result = cli("super_resolve", "--checkpoint", str(weights), str(folder / "a.png"), str(folder / "b.bmp"),
                 "--output", str(tmp_path / "good"))
    assert result.returncode == 0 and "2 image(s) written, 0 failed" in result.stderr


def test_compare_picture_with_ground_truth_and_crop(cli, weights, mini_root, tmp_path):
    hr = mini_root / "Set5" / "scene3.png"
    downscale(Image.open(hr), 3).save(tmp_path / "lr.png")
    args = ("--checkpoint", str(weights), str(tmp_path / "lr.png"), "--gt", str(hr))
    result = cli("super_resolve", *args, "--compare", str(tmp_path / "cmp.png"))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "cmp.png").size == (3 * 60 + 2 * 8, 60 + 28)  # three 60x60 panels, captions
    assert result.stdout.count("PSNR") == 2

    result = cli("super_resolve", *args, "--compare", str(tmp_path / "zoom.png"), "--crop", "10,20,16,8", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "zoom.png").size == (3 * 16 * 20 + 2 * 8, 8 * 20 + 28)  # zoomed x20


def test_a_second_run_on_a_folder_skips_the_first_runs_outputs(cli, weights, tmp_path):
    Image.effect_noise((6, 5), 40).convert("RGB").save(tmp_path / "a.png")
    assert cli("super_resolve", "--checkpoint", str(weights), str(tmp_path)).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_srcnn_x3.png"]
    again = cli("super_resolve", "--checkpoint", str(weights), str(tmp_path), "--overwrite")
    assert again.returncode == 0 and again.stderr.count("skipping 1 earlier output") == 1
    globbed = cli("super_resolve", "--checkpoint", str(weights), str(tmp_path / "*.png"), "--overwrite")
    assert globbed.returncode == 0 and "skipping 1 earlier output" in globbed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_srcnn_x3.png"]
    named = cli("super_resolve", "--checkpoint", str(weights), str(tmp_path / "a_srcnn_x3.png"))
    assert named.returncode == 0 and (tmp_path / "a_srcnn_x3_srcnn_x3.png").exists()  # asked for outright


@pytest.mark.parametrize("gt_size, accepted", [(255, True), (257, True), (258, False), (254, False)])
def test_ground_truth_size_rule_is_checked_before_any_work(cli, weights, tmp_path, gt_size, accepted):
    Image.effect_noise((85, 85), 40).convert("RGB").save(tmp_path / "lr.png")  # output 255x255
    Image.effect_noise((gt_size, gt_size), 40).convert("RGB").save(tmp_path / "gt.png")
    lr, gt = str(tmp_path / "lr.png"), str(tmp_path / "gt.png")
    result = cli("super_resolve", "--checkpoint", str(weights), lr, "--gt", gt)
    if accepted:
        assert result.returncode == 0 and result.stdout.count("PSNR") == 2
    else:
        assert_clean_error(result, f"--gt is {gt_size}x{gt_size}", "expected 255x255", "up to 2 pixels")
        assert "PSNR" not in result.stdout and not (tmp_path / "lr_srcnn_x3.png").exists()


def test_a_crop_outside_the_output_is_refused_before_any_work(cli, weights, tmp_path):
    Image.effect_noise((20, 20), 40).convert("RGB").save(tmp_path / "lr.png")
    result = cli("super_resolve", "--checkpoint", str(weights), str(tmp_path / "lr.png"),
                 "--compare", str(tmp_path / "cmp.png"), "--crop", "50,50,20,20")
    assert_clean_error(result, "outside the 60x60 output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr.png"]


def test_no_result_replaces_another_or_a_file_this_run_did_not_write(cli, weights, tmp_path):
    """Issue 60: x.tiff and x.webp in one folder gave one x_srcnn_x3.png ("8 written", 7 on disk); a
    second run replaced the first's results. Now each input has a path of its own, existing results
    are refused in one line before any work (every file as it was) unless --overwrite, or left out with
    --skip-existing (issue 69: they had counted as failures, exit 1), and another network's results have
    their own names (the quick start's default and 9-5-5 models)."""
    for suffix in ("tiff", "webp", "png"):
        Image.effect_noise((6, 5), 40).convert("RGB").save(tmp_path / f"x.{suffix}")
    first = cli("super_resolve", "--checkpoint", str(weights), str(tmp_path))
    assert first.returncode == 0 and "3 image(s) written" in first.stderr, first.stderr
    written = sorted(p.name for p in tmp_path.iterdir() if "_srcnn" in p.name)
    assert written == ["x_png_srcnn_x3.png", "x_tiff_srcnn_x3.png", "x_webp_srcnn_x3.png"]
    before = {name: (tmp_path / name).read_bytes() for name in written}
    again = cli("super_resolve", "--checkpoint", str(ROOT / "checkpoint.pth"), str(tmp_path))
    assert_clean_error(again, "3 of the 3 results exist already", "--skip-existing", "--overwrite")
    assert {name: (tmp_path / name).read_bytes() for name in written} == before
    (tmp_path / "y.png").write_bytes((tmp_path / "x.png").read_bytes())
    skipping = cli("super_resolve", "--checkpoint", str(weights), str(tmp_path), "--skip-existing")
    assert skipping.returncode == 0 and "1 image(s) written, 0 failed, 3 skipped" in skipping.stderr
    assert {name: (tmp_path / name).read_bytes() for name in written} == before
    (tmp_path / "y.png").unlink()
    (tmp_path / "y_srcnn_x3.png").unlink()
    single = cli("super_resolve", "--checkpoint", str(weights), str(tmp_path / "x.png"), "--output",
                 str(tmp_path / "x_png_srcnn_x3.png"))
    assert_clean_error(single, "exists already", "--overwrite")
    nine = SRCNN(Shape((9, 5, 5), channels=1))
    torch.save(nine.state_dict(), tmp_path / "955y.pth")
    other = cli("super_resolve", "--checkpoint", str(tmp_path / "955y.pth"), str(tmp_path / "x.png"))
    assert other.returncode == 0 and (tmp_path / "x_srcnn955y_x3.png").exists()
    replaced = cli("super_resolve", "--checkpoint", str(weights), str(tmp_path), "--overwrite")
    assert replaced.returncode == 0 and "skipping 4 earlier output" in replaced.stderr


def test_inputs_that_would_share_an_output_are_refused_before_any_work(cli, weights, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.effect_noise((6, 5), 40).convert("RGB").save(tmp_path / folder / "x.png")
    result = cli("super_resolve", "--checkpoint", str(weights), str(tmp_path / "a" / "x.png"),
                 str(tmp_path / "b" / "x.png"), "--output", str(tmp_path / "out"))
    assert_clean_error(result, "would both be written to", str(tmp_path / "out" / "x_png_srcnn_x3.png"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--output", "--compare"])
def test_an_output_path_with_no_image_format_is_refused_before_any_image_is_read(cli, weights, tmp_path, flag,
                                                                                 monkeypatch):
    """Issue 69: `--output big_out.xyz` upscaled for 55 s, then failed on the extension; `--compare
    cmp.xyz` failed after the output was written. Every output path is now checked before the first
    image is read (here reading it would fail the test), and nothing is written."""
    import super_resolve

    Image.effect_noise((6, 5), 40).convert("RGB").save(tmp_path / "x.png")
    monkeypatch.setattr(super_resolve, "load_image", lambda path: pytest.fail(f"{path} was read"))
    paths = {"--output": str(tmp_path / "out.png"), "--gt": str(tmp_path / "x.png")}
    paths[flag] = str(tmp_path / "out.xyz")
    result = cli("super_resolve", "--checkpoint", str(weights), str(tmp_path / "x.png"),
                 *[part for pair in paths.items() for part in pair])
    assert_clean_error(result, "unknown image file extension '.xyz'", str(tmp_path / "out.xyz"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_a_multi_frame_image_says_it_takes_the_first_frame(cli, weights, tmp_path):
    """Issue 69: an animated GIF was upscaled from its first frame without a word."""
    frames = [Image.new("RGB", (6, 5), colour) for colour in ("red", "blue", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    result = cli("super_resolve", "--checkpoint", str(weights), str(tmp_path / "anim.gif"))
    assert result.returncode == 0 and "anim.gif holds 3 frames; upscaling the first" in result.stderr
    frames[0].save(tmp_path / "still.gif")
    result = cli("super_resolve", "--checkpoint", str(weights), str(tmp_path / "still.gif"))
    assert result.returncode == 0 and "frames" not in result.stderr
