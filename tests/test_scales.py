"""Scales 2, 3 and 4: training, evaluation and super_resolve all follow the checkpoint's scale."""

import pytest
import torch
from PIL import Image

from conftest import assert_clean_error
from model import SRCNN


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_train_evaluate_super_resolve_at_each_scale(cli, mini_root, tmp_path, scale):
    out = tmp_path / "ck"
    result = cli("train", "train", "--scale", str(scale), "--num-epoch", "1", "--batch-size", "8",
                 "--data-root", str(mini_root), "--checkpoint-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert torch.load(out / "last.pth", weights_only=True)["scale"] == scale

    result = cli("train", "evaluate", str(out / "last.pth"), "--data-root", str(mini_root), "--sets", "Set5")
    assert result.returncode == 0 and f"x{scale}" in result.stdout

    Image.effect_noise((11, 7), 50).convert("RGB").save(tmp_path / "lr.png")
    assert cli("super_resolve", "--checkpoint", str(out / "last.pth"), str(tmp_path / "lr.png")).returncode == 0
    assert Image.open(tmp_path / f"lr_srcnn_x{scale}.png").size == (11 * scale, 7 * scale)

    other = 3 if scale != 3 else 2
    lr = str(tmp_path / "lr.png")
    result = cli("super_resolve", "--checkpoint", str(out / "last.pth"), lr, "--scale", str(other))
    assert_clean_error(result, f"x{scale}")
    assert_clean_error(cli("train", "resume", str(out / "last.pth"), "--scale", str(other)), "contradicts")


def test_init_from_a_checkpoint_of_another_scale(cli, mini_root, tmp_path):
    """--init CHECKPOINT: an x2 run starts from the x3 model's weights (not its optimizer or history);
    a resumed run keeps its own weights; a bad --init ends in one line before any work."""
    start = tmp_path / "start.pth"
    torch.save({k: v * 0.5 for k, v in SRCNN().state_dict().items()}, start)  # a bare state_dict, taken as x3
    out = tmp_path / "x2"
    result = cli("train", "train", "--scale", "2", "--init", str(start), "--num-epoch", "1", "--lr", "1e-12",
                 "--data-root", str(mini_root), "--checkpoint-dir", str(out))
    assert result.returncode == 0, result.stderr
    trained = torch.load(out / "last.pth", weights_only=True)
    assert trained["scale"] == 2 and trained["epoch"] == 1 and len(trained["history"]) == 1
    for name, weight in torch.load(start, weights_only=True).items():  # lr 1e-12: still the start's weights
        torch.testing.assert_close(trained["model"][name], weight, rtol=0, atol=1e-6)
    start.unlink()  # resume no longer needs it
    assert cli("train", "resume", str(out / "last.pth"), "--num-epoch", "2").returncode == 0
    assert_clean_error(cli("train", "train", "--init", str(start), "--checkpoint-dir", str(tmp_path / "no")),
                       "checkpoint not found")
    assert not (tmp_path / "no").exists()
