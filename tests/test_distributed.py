"""torchrun with 2 CPU processes (gloo on 127.0.0.1) gives the single-process result."""

import os
import subprocess
import sys

import torch

from conftest import ROOT


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)


def test_two_processes_equal_one_with_the_same_global_batch(cli, mini_root, tmp_path):
    flags = ("--batch-size", "8", "--num-epoch", "2", "--lr", "1e-3", "--augment", "--fresh-crops",
             "--data-root", str(mini_root))
    assert cli("train", "train", *flags, "--checkpoint-dir", str(tmp_path / "one")).returncode == 0
    result = torchrun("train", *flags, "--checkpoint-dir", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("PSNR") == 2  # rank 0 alone evaluates and prints
    one = torch.load(tmp_path / "one" / "last.pth", weights_only=True)
    two = torch.load(tmp_path / "two" / "last.pth", weights_only=True)
    for key, value in one["model"].items():
        assert torch.allclose(two["model"][key], value, rtol=1e-4, atol=1e-5), key
    assert [h["epoch"] for h in two["history"]] == [1, 2]

    # checkpoints cross over: a torchrun checkpoint resumes in one process, and the other way round
    result = cli("train", "resume", str(tmp_path / "two" / "last.pth"), "--num-epoch", "3")
    assert result.returncode == 0, result.stderr
    result = torchrun("resume", str(tmp_path / "one" / "last.pth"), "--num-epoch", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(tmp_path / "one" / "last.pth", weights_only=True)["epoch"] == 3


def test_amp_on_the_cpu_is_ignored_with_a_note(cli, mini_root, tmp_path):
    flags = ("--batch-size", "8", "--num-epoch", "1", "--data-root", str(mini_root))
    result = cli("train", "train", *flags, "--amp", "--checkpoint-dir", str(tmp_path / "amp"))
    assert result.returncode == 0 and "--amp applies to CUDA only" in result.stderr
    assert cli("train", "train", *flags, "--checkpoint-dir", str(tmp_path / "plain")).returncode == 0
    a = torch.load(tmp_path / "amp" / "last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "plain" / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # float32 all the same
