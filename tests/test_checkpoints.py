"""What every checkpoint holds: CPU tensors only (it must load where the training device is
missing), and the whole training state, the fp16 loss scale included."""

import copy
import os
from unittest.mock import MagicMock

import pytest
import torch

import checkpoint
from model import SRCNN
from train import build_parser


def test_tensors_from_another_device_are_written_from_the_cpu(tmp_path):
    on_gpu = MagicMock(spec=torch.Tensor, device=torch.device("cuda", 0))  # stands for a GPU tensor
    on_gpu.detach.return_value = on_gpu
    on_gpu.cpu.return_value = torch.arange(3.0)
    state = {"optimizer": {"state": {0: {"exp_avg": on_gpu}}}, "rng": [on_gpu, (on_gpu, 1)], "epoch": 2}
    checkpoint.save(state, tmp_path / "c.pth")  # a GPU tensor left in would not even pickle here
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], torch.arange(3.0))
    assert torch.equal(loaded["rng"][1][0], torch.arange(3.0)) and loaded["rng"][1][1] == 1 and loaded["epoch"] == 2


def parts(seed: int) -> tuple:
    """(model, moving average, Adam, fp16 loss scaler, generator) of a run, from `seed`."""
    torch.manual_seed(seed)
    model = SRCNN()
    return (model, copy.deepcopy(model), torch.optim.Adam(model.parameters()), torch.amp.GradScaler("cpu"),
            torch.Generator().manual_seed(seed))


def test_a_run_is_restored_from_its_checkpoint_whole(tmp_path):
    args = vars(build_parser()[1].parse_args(["--ema-decay", "0.99"]))
    model, ema, optimizer, scaler, generator = parts(0)
    model(torch.rand(2, 3, 20, 20)).mean().backward()
    optimizer.step()
    ema.conv1.bias.data += 1  # the average differs from the trained weights
    scaler.scale(torch.ones(()))  # the scale exists from the first scaled loss on
    scaler.update(new_scale=256.0)
    progress = checkpoint.Progress(3, [{"epoch": 3}], 30.5, [{"epoch": 0, "command": "python train.py train"}],
                                   {"batch": 4, "batches": 9, "loss_sum": 1.0, "seconds": 2.0})
    checkpoint.save(checkpoint.training_checkpoint(args, progress, model, ema, optimizer, scaler, generator),
                    tmp_path / "c.pth")
    saved = checkpoint.load(tmp_path / "c.pth")
    checkpoint.check_resumable(tmp_path / "c.pth", saved)

    fresh = parts(1)
    restored = checkpoint.restore_training(saved, *fresh)
    assert restored == progress
    for before, after in zip((model, ema), fresh[:2], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values(),
                                                     strict=True))
    assert fresh[2].state_dict()["state"][0]["step"] == 1 and fresh[3].get_scale() == 256.0
    assert torch.equal(fresh[4].get_state(), generator.get_state())


def test_the_atomic_writer_renames_a_new_file_over_the_old_never_writes_into_it(tmp_path):
    """Issue 60: pinned by behaviour, not by a kill test's timing. A hard link to the old file still
    holds the old bytes after a save (the old file was never written into), the path holds the new
    ones, and a write that fails leaves the old file and no temporary one."""
    from files import atomic_write

    path = tmp_path / "last.pth"
    with atomic_write(path) as f:
        f.write(b"old run")
    os.link(path, tmp_path / "held")
    with atomic_write(path) as f:
        f.write(b"new run, longer")
    assert (tmp_path / "held").read_bytes() == b"old run" and path.read_bytes() == b"new run, longer"
    assert os.stat(path).st_ino != os.stat(tmp_path / "held").st_ino
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"half")
        raise RuntimeError("the writer failed midway")
    assert path.read_bytes() == b"new run, longer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["held", "last.pth"]
