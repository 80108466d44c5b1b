"""The GPU suite: training, resume, mixed precision, evaluation and inference on CUDA, and
checkpoints that load without a GPU. It runs where torch.cuda.is_available(); elsewhere every test
is skipped with the reason shown (`python -m pytest tests/test_cuda.py` on a GPU machine)."""

import contextlib
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint import load_model
from conftest import ROOT, run
from data import downscale, load_pairs
from metrics import evaluate
from model import SRCNN, Shape

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU suite needs one"),
              pytest.mark.slow]
QUICK = ("--batch-size", "8", "--lr", "1e-3", "--augment", "--fresh-crops")
LEARN = ("--batch-size", "64", "--lr", "1e-3", "--augment", "--fresh-crops", "--num-epoch", "3")


def train(*args, timeout=600):
    result = run("train.py", *args, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_then_resume_equals_one_run(mini_root, tmp_path):
    flags = (*QUICK, "--cuda", "--data-root", str(mini_root))
    train("train", *flags, "--num-epoch", "2", "--checkpoint-dir", str(tmp_path / "whole"))
    train("train", *flags, "--num-epoch", "1", "--checkpoint-dir", str(tmp_path / "half"))
    train("resume", str(tmp_path / "half" / "last.pth"), "--num-epoch", "2", "--cuda")
    whole = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "half" / "last.pth", weights_only=True)["model"]
    for key, value in whole.items():
        assert torch.allclose(resumed[key], value, rtol=1e-4, atol=1e-6), key


def test_a_gpu_checkpoint_loads_without_a_gpu(mini_root, tmp_path):
    train("train", *QUICK, "--amp", "fp16", "--cuda", "--num-epoch", "1", "--data-root", str(mini_root),
          "--checkpoint-dir", str(tmp_path))
    script = ("import sys, torch; assert not torch.cuda.is_available(); "
              "c = torch.load(sys.argv[1], weights_only=True); "
              "print(c['scaler']['scale'], len(c['optimizer']['state']))")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "last.pth")], capture_output=True,
                            text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split()[0]) > 0 and int(result.stdout.split()[1]) == 6  # Adam state per tensor


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_learns(real_data, tmp_path, amp):
    result = train("train", *LEARN, "--amp", amp, "--cuda", "--data-root", str(real_data),
                   "--checkpoint-dir", str(tmp_path))
    history = torch.load(tmp_path / "last.pth", weights_only=True)["history"]
    assert all(np.isfinite(h["loss"]) for h in history), result.stdout
    assert history[-1]["psnr"] > 30.40  # bicubic on Set5


def test_evaluate_on_the_gpu_equals_the_cpu(real_data):
    pairs = load_pairs(real_data / "Set5", 3)
    cpu = evaluate(load_model(ROOT / "checkpoint.pth", torch.device("cpu"))[0], pairs, 3)["psnr"]
    gpu = evaluate(load_model(ROOT / "checkpoint.pth", torch.device("cuda"))[0], pairs, 3)["psnr"]
    assert abs(cpu - gpu) < 0.01


def test_super_resolve_on_the_gpu_equals_the_cpu(real_data, tmp_path):
    downscale(Image.open(real_data / "Set5" / "butterfly.png").convert("RGB"), 3).save(tmp_path / "lr.png")
    for device, flags in (("cpu", ()), ("gpu", ("--cuda",))):
        result = run("super_resolve.py", "--checkpoint", str(ROOT / "checkpoint.pth"), str(tmp_path / "lr.png"),
                     "--output", str(tmp_path / f"{device}.png"), *flags)
        assert result.returncode == 0, result.stderr
    cpu, gpu = (np.asarray(Image.open(tmp_path / f"{d}.png"), dtype=np.int16) for d in ("cpu", "gpu"))
    difference = np.abs(cpu - gpu)
    assert difference.max() <= 1 and (difference == 0).mean() >= 0.999


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="torchrun on NCCL needs two GPUs")
def test_torchrun_on_two_gpus(mini_root, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), "train", *QUICK, "--cuda", "--num-epoch", "2", "--data-root", str(mini_root),
           "--checkpoint-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "last.pth", weights_only=True)
    assert checkpoint["epoch"] == 2 and "torch.distributed.run" in checkpoint["commands"][0]["command"]


def test_patches_held_and_streamed_on_the_gpu_are_the_cpus(mini_root):
    """The images go to the GPU from page-locked memory, without waiting for the copy: what a batch
    takes there is what it takes on the CPU, held or streamed a part at a time."""
    from data import TrainingPatches
    from streaming import StreamedPatches

    index = torch.arange(0, 18, 2)
    for make in (lambda device: TrainingPatches([mini_root / "T91"], 3, 33, 14, device=device),
                 lambda device: StreamedPatches([mini_root / "T91"], 3, 33, 14, (1.0,), device, "pil",
                                                budget=200_000, workers=1)):
        on_cpu, on_gpu = make("cpu"), make("cuda")
        for cpu, gpu in zip(on_cpu.take(index), on_gpu.take(index), strict=True):
            assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


def test_tf32_is_what_moves_the_gpus_pixels_and_ieee_float32_makes_them_the_cpus(real_data):
    """The measurement behind inference.ieee_float32_convolutions: the network on the GPU with cuDNN's
    TF32 convolutions (PyTorch's default) and in IEEE float32, each against the CPU (PyTorch and
    ONNX Runtime), as the share of 8-bit pixels that differ."""
    from data import image_to_tensor, quantize, upscale
    from onnx_engine import engine_for

    hr = Image.open(real_data / "Set5" / "butterfly.png").convert("RGB")
    x = image_to_tensor(upscale(downscale(hr, 3), 3)).float().div(255).unsqueeze(0)
    cpu_model, gpu_model = (load_model(ROOT / "checkpoint.pth", torch.device(d))[0] for d in ("cpu", "cuda"))
    with torch.no_grad():
        cpu = {"pytorch": quantize(cpu_model(x))[0],
               "onnxruntime": quantize(engine_for(cpu_model, "onnxruntime")(x))[0]}
    before = torch.backends.cudnn.conv.fp32_precision
    shares = {}
    try:
        for precision in ("tf32", "ieee"):
            torch.backends.cudnn.conv.fp32_precision = precision
            with torch.no_grad():
                gpu = quantize(gpu_model(x.cuda()))[0].cpu()
            for engine, reference in cpu.items():
                shares[precision, engine] = (gpu != reference).float().mean().item()
    finally:
        torch.backends.cudnn.conv.fp32_precision = before
    print(shares)  # pytest -s shows the measurement
    assert all(shares["ieee", engine] < 0.001 for engine in cpu), shares
    assert all(shares["tf32", engine] > 10 * shares["ieee", engine] for engine in cpu), shares


@contextlib.contextmanager
def ieee_and_deterministic():
    """cuDNN and cuBLAS in IEEE float32 with deterministic algorithms, so that a captured step and a
    plain one can differ only by what they compute differently, not by TF32 or atomics."""
    saved = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled())
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved[:4]
        torch.use_deterministic_algorithms(saved[4])


def cuda_run(channels: int, border: int, amp: str = "off") -> tuple:
    """(model, moving average, Adam, args, autocast, scaler) on the GPU, as the Trainer makes them."""
    from step import mixed_precision

    torch.manual_seed(0)
    model = SRCNN(Shape(channels=channels)).cuda().to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    args = {"patch_size": 24, "loss_border": border, "ema_decay": 0.9, "amp": amp, "cuda_graph": "auto"}
    return (model, ema, optimizer, args, *mixed_precision(args, torch.device("cuda")))


def assert_same_state(captured: tuple, plain: tuple, share: float, where: str) -> None:
    """Weights, moving average, Adam's moments and step counts of two runs: each tensor within `share`
    of its largest value in the plain run, the step counts equal."""
    from step import state_tensors

    ours, theirs = state_tensors(*captured[:3]), state_tensors(*plain[:3])
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        off = (ours[name].double().cpu() - value.double().cpu()).abs().max().item()
        if "step" in name:
            assert off == 0, (where, name)
        else:
            assert off <= share * value.abs().max().item(), (where, name, off)


@pytest.mark.parametrize("border", [0, 3])
@pytest.mark.parametrize("channels", [3, 1], ids=["rgb", "y"])
def test_captured_steps_interleaved_with_plain_batches_saves_and_evaluations_are_the_plain_steps(
        channels, border, tmp_path, mini_root):
    """Warm-up, capture (and its check), replays, an epoch's partial batch taken eagerly, a save and
    an evaluation between, more replays; the learning rate and the flip/rotation change every step and
    the moving average's clamp is active from step 11 ((1 + t) / (10 + t) > 0.9). After every step the
    captured run's state equals the plain run's within 1e-6 of each tensor's largest value."""
    import checkpoint
    from data import ImagePairs
    from step import CapturedStep, capturable, make_batch, optimizer_steps, set_learning_rate, train_step, update_ema

    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 8 if i in (6, 13) else 16, 3, 24, 24), generator=generator,
                             dtype=torch.uint8).cuda() for i in range(20)]  # 6 and 13: partial batches
    pairs = ImagePairs(mini_root / "Set5", 3)
    with ieee_and_deterministic():
        plain, captured = cuda_run(channels, border), cuda_run(channels, border)
        capturable(captured[2])
        step = CapturedStep(*captured)
        for i, (inputs, targets) in enumerate(batches):
            lr, transform = 1e-3 * (1 - i / 40), (3 * i) % 8
            for run in (plain, captured):
                model, ema, optimizer, args, autocast, scaler = run
                set_learning_rate(optimizer, lr)
                if run is captured and len(inputs) == 16:
                    assert step(inputs, targets, transform) is not None, step.failure
                    continue
                x, y = make_batch(inputs, targets, transform, channels == 1)
                train_step(model, optimizer, x, y, autocast, scaler, border)
                update_ema(ema, model, args["ema_decay"], optimizer_steps(optimizer))
            assert_same_state(captured, plain, 1e-6, f"step {i}")
            if i in (8, 15):  # a save and an evaluation between replays, as at an epoch's end
                model, ema, optimizer, args, _, scaler = captured
                state = checkpoint.training_checkpoint({**args, "scale": 3}, checkpoint.Progress(), model, ema,
                                                       optimizer, scaler, torch.Generator())
                checkpoint.save(state, tmp_path / "last.pth")
                ema.eval()
                evaluate(ema, pairs, 3)
                ema.train()
        assert step.replay is not None and step.failure is None


def test_a_capture_made_with_garbage_in_its_buffers_replays_the_real_values():
    """What a graph records is operations on buffers, not their values: captured with a random batch,
    flip 7 and a learning rate of 123 in them, then replayed on the real ones, it is the plain step."""
    from step import CapturedStep, capturable, make_batch, optimizer_steps, set_learning_rate, train_step, update_ema

    generator = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 256, (2, 16, 3, 24, 24), generator=generator, dtype=torch.uint8).cuda()
               for _ in range(8)]
    with ieee_and_deterministic():
        plain, captured = cuda_run(3, 0), cuda_run(3, 0)
        capturable(captured[2])
        step = CapturedStep(*captured)
        for i, (inputs, targets) in enumerate(batches):
            set_learning_rate(plain[2], 1e-3)
            x, y = make_batch(inputs, targets, i % 8)
            train_step(plain[0], plain[2], x, y, *plain[4:])
            update_ema(plain[1], plain[0], 0.9, optimizer_steps(plain[2]))
            if i < CapturedStep.WARMUP:
                set_learning_rate(captured[2], 1e-3)
                step(inputs, targets, i % 8)
                continue
            if step.replay is None:
                step.load(torch.randint_like(inputs, 256), torch.randint_like(targets, 256), 7)
                set_learning_rate(captured[2], 123.0)
                step.replay = step.record()
            set_learning_rate(captured[2], 1e-3)
            step.load(inputs, targets, i % 8)
            step.replay()
            assert_same_state(captured, plain, 1e-6, f"step {i}")


def test_train_and_resume_captured_equal_the_plain_step(mini_root, tmp_path):
    """The x3 recipe's flags on a set of 268 patches (16 batches of 16 and one of 12), 2 epochs then
    resume for a third, with --cuda-graph auto and off: the same weights and Adam's moments within
    rtol 1e-3 (TF32 in both), the same learning rates in the history."""
    results = {}
    for mode in ("auto", "off"):
        out = tmp_path / mode
        flags = ("--cuda", "--cuda-graph", mode, "--data-root", str(mini_root))
        first = train("train", "@recipes/x3.args", "--stride", "3", "--num-epoch", "2", *flags,
                      "--checkpoint-dir", str(out))
        assert ("captured as a CUDA graph" in first.stderr) == (mode == "auto"), first.stderr
        assert "given up" not in first.stderr and "plain from epoch" not in first.stderr, first.stderr
        train("resume", str(out / "last.pth"), "--num-epoch", "3", "--cuda")
        results[mode] = torch.load(out / "last.pth", weights_only=True)
    captured, plain = results["auto"], results["off"]
    assert captured["args"]["cuda_graph"] == "auto" and plain["args"]["cuda_graph"] == "off"
    assert [h["lr"] for h in captured["history"]] == [h["lr"] for h in plain["history"]]
    for part in ("model", "training_weights"):
        for key, value in plain[part].items():
            assert torch.allclose(captured[part][key], value, rtol=1e-3, atol=1e-5), (part, key)
    for index, state in plain["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            other = captured["optimizer"]["state"][index][key]
            assert torch.allclose(other, state[key], rtol=1e-3, atol=1e-3 * state[key].abs().max()), (index, key)
        assert int(captured["optimizer"]["state"][index]["step"]) == int(state["step"]) == 3 * 17


def test_a_captured_run_stopped_mid_epoch_resumes_to_the_uninterrupted_weights(mini_root, tmp_path):
    import signal

    from test_faults import wait_for_line

    flags = ("--batch-size", "2", "--stride", "2", "--lr", "1e-3", "--augment", "--fresh-crops", "--ema-decay",
             "0.999", "--num-epoch", "4", "--cuda", "--cuda-graph", "auto", "--data-root", str(mini_root))  # 400 steps
    whole = train("train", *flags, "--checkpoint-dir", str(tmp_path / "whole"))
    assert "captured as a CUDA graph" in whole.stderr
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "train", *flags, "--checkpoint-dir",
                             str(tmp_path / "cut")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    wait_for_line(proc, "epoch    1")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert torch.load(tmp_path / "cut" / "interrupted.pth", weights_only=True)["position"] is not None
    train("resume", str(tmp_path / "cut" / "interrupted.pth"), "--cuda")
    expected = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)
    got = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)
    for part in ("model", "training_weights"):
        for key, value in expected[part].items():
            assert torch.allclose(got[part][key], value, rtol=1e-3, atol=1e-5), (part, key)
    assert isinstance(got["optimizer"]["param_groups"][0]["lr"], float)  # saved as a plain Adam's
