"""Scales 2, 3 and 4: training, evaluation and super_resolve all follow the checkpoint's scale."""

import pytest
import torch
from PIL import Image

from conftest import assert_clean_error


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
