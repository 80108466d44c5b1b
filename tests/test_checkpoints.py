"""What every checkpoint holds: CPU tensors only (it must load where the training device is
missing), and the whole training state, the fp16 loss scale included."""

from unittest.mock import MagicMock

import torch

from train import build_parser
from training_state import TrainingState
from utils import load_checkpoint, save_checkpoint


def test_tensors_from_another_device_are_written_from_the_cpu(tmp_path):
    on_gpu = MagicMock(spec=torch.Tensor, device=torch.device("cuda", 0))  # stands for a GPU tensor
    on_gpu.detach.return_value = on_gpu
    on_gpu.cpu.return_value = torch.arange(3.0)
    checkpoint = {"optimizer": {"state": {0: {"exp_avg": on_gpu}}}, "rng": [on_gpu, (on_gpu, 1)], "epoch": 2}
    save_checkpoint(checkpoint, tmp_path / "c.pth")  # a GPU tensor left in would not even pickle here
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], torch.arange(3.0))
    assert torch.equal(loaded["rng"][1][0], torch.arange(3.0)) and loaded["rng"][1][1] == 1 and loaded["epoch"] == 2


def test_the_fp16_loss_scale_is_saved_and_restored(tmp_path):
    args = vars(build_parser()[1].parse_args([]))
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # the scale exists from the first scaled loss on
    scaler.update(new_scale=256.0)
    save_checkpoint(TrainingState.from_checkpoint(args, torch.device("cpu"), scaler=scaler).to_checkpoint(),
                    tmp_path / "c.pth")
    resumed = TrainingState.from_checkpoint(args, torch.device("cpu"), load_checkpoint(tmp_path / "c.pth"),
                                            scaler=torch.amp.GradScaler("cpu"))
    assert resumed.scaler.get_scale() == 256.0
