"""Training sets larger than --data-memory: streamed a part at a time, every patch once an epoch,
the same weights from the same command, and exact resume, mid-epoch too."""

import signal
import subprocess
import sys
from collections import Counter

import pytest
import torch
from test_faults import wait_for_line

from conftest import ROOT
from data import TrainingPatches
from processes import Processes
from streaming import StreamedPatches

pytestmark = pytest.mark.slow  # training processes: left out of the quick subset

STREAMED = ("--data-memory", "80KB", "--workers", "1")  # a 72x72 image takes 31 KB: one image a part


def test_an_epoch_streams_every_patch_once_a_part_at_a_time(mini_root):
    whole = TrainingPatches([mini_root / "T91"], 3, 33, 14)
    streamed = StreamedPatches([mini_root / "T91"], 3, 33, 14, (1.0,), "cpu", "pil", budget=80_000, workers=1)
    everything = Counter(bytes(p.numpy().tobytes()) for p in whole.take(torch.arange(len(whole)))[0])
    generator = torch.Generator().manual_seed(0)
    streamed.new_epoch(generator, move_grid=False)
    batches = streamed.batches(4, Processes(torch.device("cpu")), 0, 0)
    assert len(streamed.parts) == 2 and len(streamed) == len(whole) == 18
    seen = Counter(bytes(p.numpy().tobytes()) for index in batches for p in streamed.take(index)[0])
    assert seen == everything and len(batches) == 2 * 3  # 9 patches a part: batches of 4, 4, 1


def train(mini_root, out, *flags) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), "train", "--batch-size", "2", "--stride", "6", "--augment",
           "--fresh-crops", *STREAMED, *flags, "--data-root", str(mini_root), "--checkpoint-dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return torch.load(out / "last.pth", weights_only=True)


def test_a_streamed_run_is_the_same_twice_and_resumes_exactly(cli, mini_root, tmp_path):
    once = train(mini_root, tmp_path / "a", "--num-epoch", "2")
    twice = train(mini_root, tmp_path / "b", "--num-epoch", "2")
    assert all(torch.equal(once["model"][k], twice["model"][k]) for k in once["model"])
    train(mini_root, tmp_path / "c", "--num-epoch", "1")
    assert cli("train", "resume", str(tmp_path / "c" / "last.pth"), "--num-epoch", "2").returncode == 0
    resumed = torch.load(tmp_path / "c" / "last.pth", weights_only=True)
    assert all(torch.equal(once["model"][k], resumed["model"][k]) for k in once["model"])

    cmd = [sys.executable, str(ROOT / "train.py"), "train", "--batch-size", "1", "--stride", "6", "--augment",
           "--fresh-crops", "--num-epoch", "3", *STREAMED, "--data-root", str(mini_root),
           "--checkpoint-dir", str(tmp_path / "d")]
    whole = subprocess.run([*cmd[:-1], str(tmp_path / "e")], capture_output=True, text=True, cwd=ROOT)
    assert whole.returncode == 0, whole.stderr
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for_line(proc, "epoch    1")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert cli("train", "resume", str(tmp_path / "d" / "interrupted.pth")).returncode == 0
    expected = torch.load(tmp_path / "e" / "last.pth", weights_only=True)["model"]
    got = torch.load(tmp_path / "d" / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(expected[k], got[k]) for k in expected)
