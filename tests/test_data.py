import contextlib
import functools
import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import resize_right
import torch
from PIL import Image

import data
import train
from conftest import ROOT, assert_clean_error, find_real_data, generated_image
from data import TrainingPatches, degrade, list_images, load_pairs, matlab_resize, modcrop
from download import download, read_manifest
from files import current_umask
from processes import Processes
from utils import UserError


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_degradation_sizes_modcrop_not_resize():
    hr = Image.fromarray(np.random.default_rng(0).integers(0, 256, (71, 100, 3), dtype=np.uint8))
    lr_up, hr_cropped = degrade(hr, 3)
    assert hr_cropped.size == (99, 69) and lr_up.size == (99, 69)
    # the pixels of the top-left 99x69, unchanged: cropped, never resized
    assert np.array_equal(np.asarray(hr_cropped), np.asarray(hr)[:69, :99])


def test_evaluation_pairs_are_uint8_and_same_size(mini_root):
    pairs = load_pairs(mini_root / "Set5", 3)
    assert [name for name, _, _ in pairs] == ["scene3", "scene4"]
    for _, x, y in pairs:
        assert x.dtype == torch.uint8 and x.shape == y.shape == (3, 60, 60)


def test_patch_count_and_content(mini_root):
    patches = TrainingPatches([mini_root / "T91"], scale=3, patch_size=33, stride=14)
    per_side = (72 - 33) // 14 + 1  # 3
    assert len(patches) == 2 * per_side**2
    inputs, targets = patches.take(torch.arange(len(patches)))
    assert inputs.dtype == torch.uint8 and inputs.shape == targets.shape == (18, 3, 33, 33)
    (_, x, y), (_, x2, _) = load_pairs(mini_root / "T91", 3)
    assert torch.equal(inputs[1], x[:, 0:33, 14:47])
    assert torch.equal(targets[3], y[:, 14:47, 0:33])
    assert torch.equal(inputs[9 + 8], x2[:, 28:61, 28:61])  # the second image's last patch
    patches.new_epoch(torch.Generator().manual_seed(1), move_grid=True)  # the grid moved by an offset o
    moved = patches.take(torch.tensor([0]))[0][0]
    o = next(o for o in range(14) if torch.equal(moved, x[:, o:o + 33, o:o + 33]))
    assert len(patches) == 2 * ((72 - o - 33) // 14 + 1) ** 2


def test_zooms_add_shrunk_copies_of_each_training_image(mini_root):
    pairs = load_pairs(mini_root / "T91", 3, zooms=(1.0, 0.5))
    assert [name for name, _, _ in pairs] == ["scene1", "scene1@0.5", "scene2", "scene2@0.5"]
    shrunk_x, shrunk_y = pairs[1][1:]
    assert shrunk_x.shape == shrunk_y.shape == (3, 36, 36)  # 72 * 0.5, already a multiple of 3
    original = Image.open(mini_root / "T91" / "scene1.png").resize((36, 36), Image.Resampling.BICUBIC)
    assert torch.equal(shrunk_y.permute(1, 2, 0), torch.from_numpy(np.array(original)))
    patches = TrainingPatches([mini_root / "T91"], 3, 33, 14, zooms=(1.0, 0.5))
    assert len(patches) == 2 * 3**2 + 2 * 1  # 36 px holds one 33 px patch


@pytest.mark.slow
def test_t91_patch_count(real_data):
    assert 21_800 <= len(TrainingPatches([real_data / "T91"], 3, 33, 14)) <= 22_000


def test_images_smaller_than_patch_are_refused(tmp_path):
    (tmp_path / "T91").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "T91" / "small.png")
    with pytest.raises(UserError, match="smaller than the patch size"):
        TrainingPatches([tmp_path / "T91"], 3, 33, 14)


@contextlib.contextmanager
def serve_copies(real_data, names, served):
    """http.server on 127.0.0.1 serving copies of the sets `names` from `served` (copies, so that a test
    may corrupt them); yields its URL."""
    for name in names:
        shutil.copytree(real_data / name, served / name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture()
def data_server(real_data, tmp_path):
    """A mirror of Set5."""
    with serve_copies(real_data, ["Set5"], tmp_path / "served") as url:
        yield url, tmp_path / "served"


@pytest.fixture()
def first_use(real_data, tmp_path, monkeypatch):
    """A user's first run: the default data root (SRCNN_DATA_ROOT) empty, a mirror on 127.0.0.1
    (SRCNN_DATA_URL) serving copies of T91 and Set5."""
    with serve_copies(real_data, ["T91", "Set5"], tmp_path / "served") as url:
        monkeypatch.setenv("SRCNN_DATA_ROOT", str(tmp_path / "datasets"))
        monkeypatch.setenv("SRCNN_DATA_URL", url)
        yield tmp_path / "datasets", tmp_path / "served"


@pytest.mark.slow
def test_the_first_training_run_fetches_the_known_sets_it_needs(cli, first_use, tmp_path):
    """Issue 71: a new user's first `train` ended in "fix: python data.py download ..."; now the sets it
    names that the default data root lacks are fetched there (verified), said in one line, and a
    second run fetches nothing."""
    root, _ = first_use
    flags = ("--num-epoch", "0.01", "--batch-size", "16", "--patch-size", "48", "--stride", "48")
    result = cli("train", "train", *flags, "--checkpoint-dir", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    assert "note: Set5, T91 not in" in result.stderr and "sha256-checked" in result.stderr
    for name in ("T91", "Set5"):
        rows = [r for r in read_manifest() if r["dataset"] == name]
        assert sorted(p.name for p in (root / name).iterdir()) == sorted(r["file"] for r in rows)
    again = cli("train", "train", *flags, "--checkpoint-dir", str(tmp_path / "b"))
    assert again.returncode == 0 and "fetching" not in again.stderr


def test_a_mirror_serving_a_corrupt_file_on_first_use_keeps_nothing_of_it(cli, first_use, tmp_path):
    root, served = first_use
    corrupt(served / "Set5" / "bird.png")
    result = cli("train", "evaluate", "--sets", "Set5")
    assert_clean_error(result, "sha256", "bird.png")
    assert not (root / "Set5" / "bird.png").exists() and not list((root / "Set5").glob(".*"))


def test_first_use_with_no_network_names_the_offline_route_and_a_path_is_never_fetched(cli, first_use, monkeypatch,
                                                                                      tmp_path):
    monkeypatch.setenv("SRCNN_DATA_URL", f"http://127.0.0.1:{closed_port()}")
    result = cli("train", "train", "--checkpoint-dir", str(tmp_path / "ck"))
    assert_clean_error(result, "is the mirror at http://127.0.0.1", "--data-root")
    assert not (tmp_path / "ck").exists()
    elsewhere = tmp_path / "mine"
    result = cli("train", "train", "--data-root", str(elsewhere), "--checkpoint-dir", str(tmp_path / "ck"))
    assert_clean_error(result, "T91")
    assert not elsewhere.exists()  # another data root is never filled


def test_download_fetches_verifies_and_skips(cli, data_server, tmp_path):
    url, _ = data_server
    root = tmp_path / "datasets"
    result = cli("download", "download", "--root", str(root), "--sets", "Set5", "--base-url", url)
    assert result.returncode == 0, result.stderr
    rows = [r for r in read_manifest() if r["dataset"] == "Set5"]
    assert sorted(p.name for p in (root / "Set5").iterdir()) == sorted(r["file"] for r in rows)
    assert {(p.stat().st_mode & 0o777) for p in (root / "Set5").iterdir()} == {0o666 & ~current_umask()}
    assert download(root, ["Set5"], url) == 0  # everything verified: nothing fetched again


def test_download_rejects_corrupt_file(cli, data_server, tmp_path):
    url, served = data_server
    corrupt(served / "Set5" / "bird.png")
    root = tmp_path / "datasets"
    result = cli("download", "download", "--root", str(root), "--sets", "Set5", "--base-url", url)
    assert_clean_error(result, "sha256", "bird.png")
    assert not (root / "Set5" / "bird.png").exists()
    assert not list((root / "Set5").glob(".*part"))


def test_download_unreachable_server_says_how_to_work_offline_and_leaves_no_empty_folder(cli, monkeypatch, tmp_path):
    root = tmp_path / "datasets"
    monkeypatch.setenv("SRCNN_DATA_URL", f"http://127.0.0.1:{closed_port()}")
    result = cli("download", "download", "--root", str(root), "--sets", "Set5")
    assert_clean_error(result, "--data-root", "is the mirror at")
    assert not root.exists()


def test_download_from_a_mirror_that_does_not_answer_says_so(cli, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    result = cli("download", "download", "--root", str(tmp_path / "datasets"), "--sets", "Set5", "--base-url", url)
    assert_clean_error(result, f"is the mirror at {url} running?", "--data-root")
    assert "Offline?" not in result.stderr


def test_tests_without_the_sets_fail_in_one_line_each(tmp_path):
    """No ../shared, no data root, no mirror: each test that needs the sets says why in one line."""
    env = {"SRCNN_SHARED_DATA": str(tmp_path / "no-shared"), "SRCNN_DATA_ROOT": str(tmp_path / "datasets"),
           "SRCNN_DATA_URL": f"http://127.0.0.1:{closed_port()}"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q",
                             "tests/test_shipped_model.py::test_shipped_checkpoint_holds_under_the_matlab_protocol"],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=120)
    assert result.returncode != 0
    assert "During handling" not in result.stdout and "Traceback" not in result.stdout, result.stdout
    assert "the data sets T91, Set5, Set14, BSD100 are neither in" in result.stdout, result.stdout


def test_the_fix_for_a_missing_set_works_from_another_folder(cli, monkeypatch, data_server, tmp_path):
    url, _ = data_server
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    result = cli("train", "train", "--data-root", "mydata", "--train-set", "Set5")  # not the default: not fetched
    assert_clean_error(result, "fix: python")
    fix = result.stderr.split("fix: ")[1].split(")")[0]
    assert fix.startswith(f"python {ROOT / 'data.py'} download --root mydata --sets Set5"), fix
    command = [sys.executable, *fix.split()[1:]]
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, env={**os.environ, "SRCNN_DATA_URL": url})
    assert done.returncode == 0, done.stderr
    assert len(list((work / "mydata" / "Set5").iterdir())) == 5


def test_tests_fetch_the_real_sets_into_the_data_root_when_no_folder_has_them(data_server, tmp_path):
    url, _ = data_server
    root = find_real_data(tmp_path / "no-shared", tmp_path / "datasets", url, sets=("Set5",))
    assert root == tmp_path / "datasets" and len(list((root / "Set5").iterdir())) == 5
    assert find_real_data(tmp_path / "no-shared", root, f"http://127.0.0.1:{closed_port()}", sets=("Set5",)) == root
    assert find_real_data(tmp_path, tmp_path / "unused", None, sets=("datasets",)) == tmp_path  # a shared folder


def test_tests_say_in_one_line_why_the_real_sets_are_missing(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="neither in .* nor in .* SRCNN_DATA_URL"):
        find_real_data(tmp_path / "no-shared", tmp_path / "datasets", f"http://127.0.0.1:{closed_port()}",
                       sets=("Set5",))


def test_images_smaller_than_a_patch_are_skipped_among_larger_ones(tmp_path):
    (tmp_path / "T91").mkdir()
    Image.new("RGB", (72, 72), "red").save(tmp_path / "T91" / "big.png")
    Image.new("RGB", (90, 30), "blue").save(tmp_path / "T91" / "flat.png")  # 30 px high: no 33 px patch
    patches = TrainingPatches([tmp_path / "T91"], 3, 33, 14)
    red = patches.take(torch.arange(len(patches)))[0][:, 0].float()
    assert len(patches) == 3**2 and red.mean() > 200  # all from the red image
    patches.new_epoch(torch.Generator().manual_seed(0), move_grid=True)
    assert len(patches) in (2**2, 3**2)


@pytest.mark.slow
def test_matlab_bicubic_equals_an_independent_implementation(real_data):
    """resize-right in MATLAB's mode (Keys cubic, antialiased when shrinking, symmetric borders)."""
    for path in list_images(real_data / "Set5"):
        hr = modcrop(Image.open(path).convert("RGB"), 3)
        lr = matlab_resize(hr, (hr.width // 3, hr.height // 3))
        up = matlab_resize(lr, hr.size)
        for source, ours in ((hr, lr), (lr, up)):
            theirs = resize_right.resize(np.asarray(source, dtype=np.float64), out_shape=(ours.height, ours.width, 3),
                                         pad_mode="symmetric")
            difference = np.abs(np.clip(np.round(theirs), 0, 255) - np.asarray(ours))
            assert difference.max() <= 1 and (difference == 0).mean() >= 0.999, path.name


def test_mixed_degradation_draws_each_images_input_every_epoch(mini_root):
    pil = TrainingPatches([mini_root / "T91"], 3, 33, 14)
    matlab = TrainingPatches([mini_root / "T91"], 3, 33, 14, degradation="matlab")
    mixed = TrainingPatches([mini_root / "T91"], 3, 33, 14, degradation="mixed")
    every = torch.arange(len(pil))
    (pil_in, pil_out), (matlab_in, matlab_out) = pil.take(every), matlab.take(every)
    assert not torch.equal(pil_in, matlab_in) and torch.equal(pil_out, matlab_out)
    seen = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        mixed.new_epoch(generator, move_grid=False)
        for image in range(2):  # 9 patches an image: each image's come from one of the two inputs
            part = slice(9 * image, 9 * image + 9)
            kind = [torch.equal(mixed.take(every)[0][part], made_in[part]) for made_in in (pil_in, matlab_in)]
            assert kind in ([True, False], [False, True])
            seen.add((image, kind[0]))
    assert len(seen) == 4  # both images got both kinds over the epochs
    before = generator.get_state()
    pil.new_epoch(generator, move_grid=False)  # nothing to draw: the single-kind, fixed-grid run stays as it was
    assert torch.equal(generator.get_state(), before)


# The x3 recipe's first batches of its first two epochs, as a digest of their uint8 patches and
# flips/rotations: recorded from the code that trained the shipped models (before issue 44's
# streaming), so that a change of how patches are held cannot change what a recipe trains on.
RECIPE_BATCHES_SHA256 = "c7e91e1be083ea8fe25ccbc45d730550bbc91f7c239abeefebede9edea45acdc"


@pytest.mark.slow
def test_the_x3_recipes_first_batches_are_what_they_were(real_data, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = vars(train.build_parser()[0].parse_args(
        ["train", "@recipes/x3.args", "--data-root", str(real_data), "--checkpoint-dir", str(tmp_path)]))
    trainer = train.Trainer(args, Processes(torch.device("cpu")))
    digest = hashlib.sha256()
    for epoch in range(2):
        trainer.progress.epoch = epoch
        batches, transforms = trainer.draw_epoch()
        for index, transform in zip(batches[:5], transforms[:5].tolist(), strict=True):
            for patches in trainer.patches.take(index):
                digest.update(patches.numpy().tobytes())
            digest.update(bytes([transform]))
    assert digest.hexdigest() == RECIPE_BATCHES_SHA256


def test_evaluation_pairs_are_read_an_image_at_a_time_and_bad_files_are_found_first(mini_root, tmp_path, monkeypatch):
    reads = []
    monkeypatch.setattr(data, "load_rgb", lambda path: reads.append(path) or Image.open(path).convert("RGB"))
    pairs = data.ImagePairs(mini_root / "Set5", 3)
    assert len(pairs) == 2 and reads == []  # from the names and headers alone
    first = next(iter(pairs))
    assert first[0] == "scene3" and len(reads) == 1  # the second image is not read yet
    (tmp_path / "Set5").mkdir()
    Image.new("RGB", (30, 30)).save(tmp_path / "Set5" / "good.png")
    (tmp_path / "Set5" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError, match="broken.png"):
        data.ImagePairs(tmp_path / "Set5", 3)


def test_several_training_folders_by_name_or_path(cli, mini_root, tmp_path):
    own = tmp_path / "photos"  # a folder of one's own, outside the data root
    own.mkdir()
    generated_image(72, 9).save(own / "mine.png")
    out = tmp_path / "run"
    result = cli("train", "train", "--train-set", "T91", str(own), "--data-root", str(mini_root), "--num-epoch", "1",
                 "--batch-size", "9", "--checkpoint-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert f"training on 27 patches of 33x33 from {mini_root / 'T91'}, {own}" in result.stderr  # 9 an image
    assert torch.load(out / "last.pth", weights_only=True)["args"]["train_set"] == ["T91", str(own)]
    assert f"train_set      ['T91', '{own}']" in cli("train", "inspect", str(out / "last.pth")).stdout
    missing = cli("train", "train", "--train-set", "T91", "Nowhere", "--data-root", str(mini_root),
                  "--checkpoint-dir", str(tmp_path / "none"))
    assert_clean_error(missing, "Nowhere")
    assert "also in the evaluation set" not in result.stderr


def test_a_folder_named_twice_is_refused_and_training_on_evaluation_images_is_said(cli, mini_root, tmp_path):
    """Issue 60: --train-set Set5 Set5 doubled the patches silently; training on the evaluation set
    gave no note. A folder named twice, by name or by path, ends in one line before any work."""
    for twice in (["T91", "T91"], ["T91", str(mini_root / "T91")]):
        result = cli("train", "train", "--train-set", *twice, "--data-root", str(mini_root),
                     "--checkpoint-dir", str(tmp_path / "twice"))
        assert_clean_error(result, "names", "twice")
        assert not (tmp_path / "twice").exists()
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "renamed.png").write_bytes((mini_root / "Set5" / "scene3.png").read_bytes())
    result = cli("train", "train", "--train-set", "T91", str(copy), "--data-root", str(mini_root), "--num-epoch",
                 "1", "--batch-size", "9", "--checkpoint-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert f"note: 1 training image(s) are also in the evaluation set, e.g. {copy / 'renamed.png'}" in result.stderr


def test_the_memory_the_training_images_take_is_counted_from_their_headers(cli, mini_root):
    # two 72x72 images: 2 x 72 x 72 x 3 bytes of targets and as many of inputs at zoom 1; at zoom 0.5,
    # 36x36 each; with mixed degradation, two inputs an image
    assert data.held_bytes([mini_root / "T91"], 3) == 62_208
    assert data.held_bytes([mini_root / "T91"], 3, (1.0, 0.5), kinds=2) == 3 * 62_208 * 5 // 8
    assert cli("train", "train", "--data-memory", "lots").returncode == 2  # not a size: argparse's usage error
