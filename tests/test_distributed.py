"""Several processes (torchrun, or two started by hand, gloo on 127.0.0.1): the single-process
result, collectives a CUDA run could take, failures that end every process alike, and records of
what was run."""

import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, assert_clean_error
from processes import process_group_backend

pytestmark = pytest.mark.slow  # torchrun and two training processes: left out of the quick subset


def torchrun(*args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)


def test_two_processes_equal_one_with_the_same_global_batch(cli, mini_root, tmp_path):
    flags = ("--batch-size", "8", "--num-epoch", "2", "--lr", "1e-3", "--augment", "--fresh-crops",
             "--data-root", str(mini_root))
    assert cli("train", "train", *flags, "--checkpoint-dir", str(tmp_path / "one")).returncode == 0
    result = torchrun("train", *flags, "--checkpoint-dir", str(tmp_path / "two"), "--tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("PSNR") == 2  # rank 0 alone evaluates and prints
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1  # and writes events
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


def test_amp_the_cpu_cannot_compute_natively_trains_in_float32_with_a_note(cli, mini_root, tmp_path, monkeypatch):
    """--amp fp16 on the CPU, and --amp bf16 on a CPU without native bfloat16 (here made to look so),
    train the float32 weights bit for bit after one note, and record float32."""
    import step

    monkeypatch.setattr(step, "native_bf16", lambda: None)
    flags = ("--batch-size", "8", "--num-epoch", "1", "--data-root", str(mini_root))
    assert cli("train", "train", *flags, "--checkpoint-dir", str(tmp_path / "plain")).returncode == 0
    plain = torch.load(tmp_path / "plain" / "last.pth", weights_only=True)["model"]
    for amp, note in (("fp16", "--amp fp16 applies to CUDA only"), ("bf16", "does not compute bfloat16 natively")):
        result = cli("train", "train", *flags, "--amp", amp, "--checkpoint-dir", str(tmp_path / amp))
        assert result.returncode == 0 and note in result.stderr, result.stderr
        state = torch.load(tmp_path / amp / "last.pth", weights_only=True)
        assert state["commands"][0]["precision"] == "float32" and state["args"]["amp"] == amp
        assert all(torch.equal(state["model"][k], plain[k]) for k in plain)  # float32 all the same


SITECUSTOMIZE = '''
import os
import torch.distributed as dist

def logged(collective):
    def call(tensor, *args, **kwargs):
        with open(os.environ["SRCNN_COLLECTIVE_LOG"], "a") as log:
            log.write(f"{collective.__name__} {tensor.device.type}\\n")
        return collective(tensor, *args, **kwargs)
    return call

dist.all_reduce, dist.broadcast = logged(dist.all_reduce), logged(dist.broadcast)
'''


def devices_taken(backend: str) -> set[str]:
    """The device types whose tensors a process-group backend takes ('cpu:gloo,cuda:nccl' or 'nccl')."""
    if ":" in backend:
        return {part.split(":")[0] for part in backend.split(",")}
    return set(dist.Backend.backend_capability[backend])


def test_every_collective_gets_a_tensor_that_a_cuda_run_can_take_and_torchrun_is_recorded(mini_root, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "collectives.log"
    result = torchrun("train", "--batch-size", "4", "--num-epoch", "1", "--data-root", str(mini_root),
                      "--checkpoint-dir", str(tmp_path / "out"),
                      env={"PYTHONPATH": str(tmp_path / "site"), "SRCNN_COLLECTIVE_LOG": str(log)})
    assert result.returncode == 0, result.stderr[-3000:]
    devices = {line.split()[1] for line in log.read_text().splitlines()}
    assert devices == {"cpu"}  # each process's own training device, here the CPU
    assert devices <= devices_taken(process_group_backend(torch.device("cuda")))  # NCCL alone takes only cuda
    assert not devices_taken("nccl") >= {"cpu"}  # what this test guards against
    command = torch.load(tmp_path / "out" / "last.pth", weights_only=True)["commands"][0]["command"]
    assert command.startswith("python -m torch.distributed.run --standalone --nproc_per_node=2 "), command
    assert command.endswith(f"train.py train --batch-size 4 --num-epoch 1 --data-root {mini_root} "
                            f"--checkpoint-dir {tmp_path / 'out'}"), command


def spawn(*args, rank0_limit=None):
    """Two training processes joined as torchrun would join them (env), without the launcher:
    each one's own exit code and output. `rank0_limit` caps the size of the files rank 0 writes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (rank0_limit, rank0_limit))) \
            if rank == 0 and rank0_limit else None
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit))
    return procs


def finish(procs, timeout=120):
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def stop_after_epoch_1(procs) -> None:
    """SIGTERM both processes once rank 0 has finished epoch 1; both must stop saving (exit 143)."""
    while "epoch    1" not in procs[0].stdout.readline():
        assert procs[0].poll() is None, "rank 0 ended early"
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    results = finish(procs)
    assert [r.returncode for r in results] == [143, 143], results[0].stderr[-2000:]


@pytest.fixture()
def one_epoch(cli, mini_root, tmp_path):
    out = tmp_path / "ck"
    flags = ("--batch-size", "4", "--num-epoch", "1", "--lr", "1e-3", "--data-root", str(mini_root))
    assert cli("train", "train", *flags, "--checkpoint-dir", str(out)).returncode == 0
    return out, {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.parametrize("failure, words", [("nan", "loss became"), ("disk", "cannot write checkpoint")])
def test_a_failure_in_any_process_ends_all_with_the_same_line_and_writes_nothing(one_epoch, failure, words):
    out, before = one_epoch
    flags = ["resume", str(out / "last.pth"), "--num-epoch", "3"]
    start = time.monotonic()
    if failure == "nan":  # every process's loss explodes
        procs = spawn(*flags, "--lr", "1e12")
    else:  # rank 0 alone cannot write its checkpoint at the end of the epoch
        procs = spawn(*flags, rank0_limit=64 * 1024)
    results = finish(procs)
    assert time.monotonic() - start < 60
    for result in results:
        assert result.returncode == 2
        assert_clean_error(result, words)
    assert results[0].stderr.splitlines()[-1] == results[1].stderr.splitlines()[-1]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_interrupted_under_two_processes_records_the_loss_of_both(cli, mini_root, tmp_path):
    flags = ("--batch-size", "2", "--stride", "4", "--num-epoch", "3", "--lr", "1e-3", "--data-root", str(mini_root))
    assert cli("train", "train", *flags, "--checkpoint-dir", str(tmp_path / "whole")).returncode == 0
    stop_after_epoch_1(spawn("train", *flags, "--checkpoint-dir", str(tmp_path / "two")))
    interrupted = torch.load(tmp_path / "two" / "interrupted.pth", weights_only=True)
    assert interrupted["position"] is not None and interrupted["position"]["batch"] < interrupted["position"]["batches"]
    assert cli("train", "resume", str(tmp_path / "two" / "interrupted.pth")).returncode == 0
    resumed = torch.load(tmp_path / "two" / "last.pth", weights_only=True)["history"]
    whole = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)["history"]
    for a, b in zip(resumed, whole, strict=True):  # the resumed epoch's loss counts both processes' patches
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), (a, b)


def test_two_processes_streaming_their_shares_resume_exactly(mini_root, tmp_path):
    """A set larger than --data-memory under two processes: each streams its own share of every part
    (tests/test_streaming.py), and a run stopped mid-epoch resumes to the uninterrupted run's weights."""
    flags = ("--batch-size", "2", "--stride", "6", "--augment", "--fresh-crops", "--zooms", "1", "0.8",
             "--data-memory", "60KB", "--workers", "1", "--num-epoch", "3", "--data-root", str(mini_root))
    whole = finish(spawn("train", *flags, "--checkpoint-dir", str(tmp_path / "whole")))
    assert [r.returncode for r in whole] == [0, 0], whole[0].stderr[-2000:]
    assert whole[0].stdout.count("PSNR") == 3 and "streamed in parts" in whole[0].stderr
    stop_after_epoch_1(spawn("train", *flags, "--checkpoint-dir", str(tmp_path / "two")))
    resumed = finish(spawn("resume", str(tmp_path / "two" / "interrupted.pth")))
    assert [r.returncode for r in resumed] == [0, 0], resumed[0].stderr[-2000:]
    expected = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)["model"]
    got = torch.load(tmp_path / "two" / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_process_killed_ends_the_other_with_one_line_and_no_interrupted_checkpoint(mini_root, tmp_path):
    procs = spawn("train", "--batch-size", "2", "--stride", "4", "--num-epoch", "50", "--data-root", str(mini_root),
                  "--checkpoint-dir", str(tmp_path))
    while "epoch    1" not in procs[0].stdout.readline():
        assert procs[0].poll() is None, "rank 0 ended early"
    procs[1].kill()
    survivor = finish(procs, timeout=60)[0]
    assert survivor.returncode == 2
    assert_clean_error(survivor, "another training process failed", "without writing a checkpoint")
    assert not (tmp_path / "interrupted.pth").exists()
