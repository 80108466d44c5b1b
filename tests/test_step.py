"""The training step (step.py) on the CPU: passes, the batch, the moving average, Adam's state, and
the rules of the captured step that a CUDA graph imposes and a CPU can check: nothing in the
captured body reads a tensor back to the host (NoHostReads, the way a capture fails), and the check
at capture falls back to the plain step on every failure it can meet (EagerCapture)."""

import contextlib
import copy
import importlib
import re
from collections.abc import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import train
from checkpoint import plain_adam_state
from model import SRCNN, Shape
from processes import Processes
from step import (
    CapturedStep,
    capturable,
    cpu_pass,
    graph_batch,
    last_layer_by_phase,
    make_batch,
    mixed_precision,
    moved_alike,
    optimizer_steps,
    plain_adam,
    set_learning_rate,
    state_tensors,
    train_step,
    transform_table,
    update_ema,
)

# ---------------------------------------------------------------- the guard: no host read


class HostRead(RuntimeError):
    """What a CUDA graph's capture meets as "operation not permitted when stream is capturing"."""


ATEN = torch.ops.aten
HOST_READS = {ATEN._local_scalar_dense.default, ATEN.is_nonzero.default, ATEN.equal.default, ATEN.item.default}
HOST_METHODS = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.__array__}


class NoHostReads(TorchDispatchMode):
    """Fails on every operation that brings a tensor's value to the host: a value read as a number
    (.item(), float(), bool(), a Scalar overload given a tensor), a comparison answered on the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise HostRead(f"{func} reads a tensor back to the host")
        return func(*args, **(kwargs or {}))


class NoHostCopies(TorchFunctionMode):
    """Fails on a copy to the host, which on a CPU tensor never reaches the dispatcher."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_host = func is torch.Tensor.to and any(
            str(a) == "cpu" for a in (*args[1:], kwargs.get("device")) if isinstance(a, str | torch.device))
        if func in HOST_METHODS or to_host:
            raise HostRead(f"{getattr(func, '__name__', func)} copies a tensor to the host")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_reads():
    with NoHostCopies(), NoHostReads():
        yield


@pytest.fixture()
def capturable_on_the_cpu(monkeypatch):
    """Let capturable Adam run on the CPU, as far as it does: PyTorch refuses it off CUDA before it
    computes anything, though its arithmetic is all tensor operations."""
    adam = importlib.import_module("torch.optim.adam")  # the module, which torch.optim's Adam hides
    supported = adam._get_capturable_supported_devices()
    monkeypatch.setattr(adam, "_get_capturable_supported_devices", lambda *a, **k: [*supported, "cpu"])


def a_run(channels: int = 3, ema_decay: float = 0.9, border: int = 0, amp: bool = False, size: int = 12, seed=0):
    """A model, its moving average (if `ema_decay`), a plain Adam and the step's arguments and
    precision, as the Trainer makes them on the CPU."""
    torch.manual_seed(seed)
    model = SRCNN(Shape(channels=channels)).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model) if ema_decay else None
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    args = {"patch_size": size, "loss_border": border, "ema_decay": ema_decay, "amp": "off", "cuda_graph": "auto"}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp, cache_enabled=False)
    return model, ema, optimizer, args, autocast, torch.amp.GradScaler("cpu", enabled=False)


def batches(count: int, size: int = 12, batch: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(0, 256, (batch, 3, size, size), generator=generator, dtype=torch.uint8)
                  for _ in range(2)) for _ in range(count)]


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("ema_decay", [0.0, 0.9], ids=["no-average", "average"])
@pytest.mark.parametrize("border", [0, 3])
@pytest.mark.parametrize("channels", [3, 1], ids=["rgb", "y"])
def test_the_captured_body_reads_nothing_back_to_the_host(capturable_on_the_cpu, channels, border, ema_decay, amp):
    """Everything the graph holds, run on the CPU under modes that fail on a host read: the buffers'
    fill, the learning-rate fill, the gather and conversion, forward and backward, capturable Adam,
    and the moving average with its clamp active (step 20 of decay 0.9: (1 + 20) / (10 + 20) > 0.9)."""
    model, ema, optimizer, args, autocast, scaler = a_run(channels, ema_decay, border, amp)
    capturable(optimizer)
    step = CapturedStep(model, optimizer, ema, args, autocast, scaler)
    for i, (inputs, targets) in enumerate(batches(20)):
        with no_host_reads():
            set_learning_rate(optimizer, 1e-3 * (1 - i / 40))
            step.load(inputs, targets, i % 8)
            loss = step.body()
        assert loss.isfinite()
    assert optimizer_steps(optimizer) == 20


def test_the_guard_catches_a_planted_item_and_the_old_tensor_weighted_foreach_lerp(capturable_on_the_cpu):
    """The guard fails where a capture would: an .item() added to the body, and issue 59's defect,
    _foreach_lerp_ given a 0-dim tensor weight (no overload takes one: PyTorch reads it as a Scalar)."""
    model, ema, optimizer, args, autocast, scaler = a_run()
    capturable(optimizer)

    class Planted(CapturedStep):
        def body(self):
            loss = super().body()
            print(loss.item())
            return loss

    class OldAverage(CapturedStep):
        def body(self):
            loss = train_step(self.model, self.optimizer, *(graph_batch(s, self.table, self.transform, False)
                              for s in (self.inputs, self.targets)), self.autocast, self.scaler)
            steps = self.optimizer.state[next(self.model.parameters())]["step"]
            weight = 1 - torch.clamp((1 + steps) / (10 + steps), max=self.args["ema_decay"])
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), weight)
            return loss

    inputs, targets = batches(1)[0]
    for kind in (Planted, OldAverage):
        step = kind(model, optimizer, ema, args, autocast, scaler)
        step.load(inputs, targets, 0)
        with pytest.raises(HostRead), no_host_reads():
            step.body()
    with pytest.raises(HostRead), no_host_reads():
        inputs.float().mean().cpu()


@pytest.mark.parametrize("steps", [0, 5, 20, 10_000])
def test_the_captured_moving_average_is_update_emas_bit_for_bit(steps):
    """Adam's step count as a float32 tensor on the device gives update_ema's decay to the bit, the
    clamp inactive (0, 5) and active (20, 10,000 with decay 0.9): the decay is computed in float64 as
    Python computes it, not in float32 (issue 59: 1.99974e-4 where Python has 2.0e-4)."""
    model, ema, *_ = a_run(ema_decay=0.9)
    torch.nn.init.normal_(model.conv1.weight)
    on_device = copy.deepcopy(ema)
    update_ema(ema, model, 0.9, steps)
    update_ema(on_device, model, 0.9, torch.tensor(float(steps)))
    for a, b in zip(ema.parameters(), on_device.parameters(), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the check at capture, and the fallback


class EagerCapture(CapturedStep):
    """The captured step with its recording swapped for one that runs on the CPU: `replays(self)` makes
    what the replay runs (by default the body, eagerly, as an honest graph would). Everything else,
    the check and the fallback included, is CapturedStep's own."""

    def __init__(self, *args, replays: Callable | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replays, self.recorded = replays, 0

    def side_stream(self):
        return contextlib.nullcontext()

    def record(self):
        self.recorded += 1
        if self.replays is not None:
            return self.replays(self)

        def replay():
            self.loss = self.body()
        return replay


def plain_steps(run: tuple, data: list, transforms: list[int]) -> list[torch.Tensor]:
    """What the plain step (a plain Adam) makes of `data` from the run's state; returns the losses."""
    model, ema, optimizer, args, autocast, scaler = run
    losses = []
    for i, ((inputs, targets), transform) in enumerate(zip(data, transforms, strict=True)):
        set_learning_rate(optimizer, 1e-3 * (1 - i / 40))
        x, y = make_batch(inputs, targets, transform, model.shape.channels == 1)
        losses.append(train_step(model, optimizer, x, y, autocast, scaler, args["loss_border"]))
        if ema is not None:
            update_ema(ema, model, args["ema_decay"], optimizer_steps(optimizer))
    return losses


def captured_steps(step: CapturedStep, data: list, transforms: list[int]) -> list[torch.Tensor | None]:
    losses = []
    for i, ((inputs, targets), transform) in enumerate(zip(data, transforms, strict=True)):
        set_learning_rate(step.optimizer, 1e-3 * (1 - i / 40))
        loss = step(inputs, targets, transform)
        losses.append(None if loss is None else loss.clone())
    return losses


@pytest.mark.parametrize("channels", [3, 1], ids=["rgb", "y"])
def test_an_honest_capture_passes_the_check_and_is_replayed(capturable_on_the_cpu, channels):
    """Warm-up, capture and check on the fourth batch, replays after: the same weights, average and
    Adam's moments as the plain step's, the clamp active by the end."""
    data, transforms = batches(12), [i % 8 for i in range(12)]
    plain = a_run(channels, border=3)
    plain_losses = plain_steps(plain, data, transforms)
    model, ema, optimizer, args, autocast, scaler = a_run(channels, border=3)
    capturable(optimizer)
    step = EagerCapture(model, optimizer, ema, args, autocast, scaler)
    losses = captured_steps(step, data, transforms)
    assert step.failure is None and step.replay is not None and step.recorded == 1
    assert torch.allclose(torch.stack(losses), torch.stack(plain_losses), rtol=1e-4)
    plain_state = state_tensors(plain[0], plain[1], plain[2])
    for name, tensor in state_tensors(model, ema, optimizer).items():
        assert torch.allclose(tensor.float(), plain_state[name].float(), rtol=1e-4, atol=1e-6), name


def broken_replay(how: str) -> Callable:
    """A recording whose replay makes a wrong step, in one of the ways a graph can: stale input
    buffers (the capture's batch forever), the learning rate doubled, the moving average left out."""

    def replays(step: CapturedStep) -> Callable[[], None]:
        frozen = step.inputs.clone()

        def replay():
            if how == "stale buffers":
                step.inputs.copy_(torch.zeros_like(frozen))
            if how == "learning rate":
                step.optimizer.param_groups[0]["lr"].mul_(2)
            ema, step.ema = step.ema, None if how == "no average" else step.ema
            step.loss = step.body()
            step.ema = ema
        return replay
    return replays


def failing_capture(step: CapturedStep) -> Callable[[], None]:
    step.body()  # a capture gets this far, then the driver refuses it
    raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore lines")


def silent_failure(step: CapturedStep) -> Callable[[], None]:
    raise RuntimeError()  # no message at all: still one line, naming what was raised


@pytest.mark.parametrize("replays", [failing_capture, silent_failure, broken_replay("stale buffers"),
                                     broken_replay("learning rate"), broken_replay("no average")],
                         ids=["capture error", "silent error", "stale buffers", "learning rate", "no average"])
def test_a_failed_or_wrong_capture_puts_the_state_back_and_falls_back(capturable_on_the_cpu, replays):
    """The fourth batch is the capture's: on its failure the weights, average and Adam's state are put
    back bit for bit as they were after the third, Adam is a plain Adam again, `failure` says why in
    one line, and every later call leaves the step to the caller's plain path."""
    data, transforms = batches(6), [i % 8 for i in range(6)]
    run = a_run()
    model, ema, optimizer, args, autocast, scaler = run
    capturable(optimizer)
    step = EagerCapture(model, optimizer, ema, args, autocast, scaler, replays=replays)
    captured_steps(step, data[:3], transforms[:3])
    before = {name: t.clone() for name, t in state_tensors(model, ema, optimizer).items()}
    assert captured_steps(step, data[3:], transforms[3:]) == [None, None, None]
    assert step.failure and "\n" not in step.failure and step.replay is None and step.recorded == 1
    for name, tensor in state_tensors(model, ema, optimizer).items():
        assert torch.equal(tensor, before[name]), name
    group = optimizer.param_groups[0]
    assert isinstance(group["lr"], float) and not group["capturable"]
    assert all(state["step"].device.type == "cpu" for state in optimizer.state.values())
    plain_steps(run, data[3:], transforms[3:])  # and the plain step takes over
    assert optimizer_steps(optimizer) == 6


def test_the_trainer_goes_on_with_the_plain_step_says_why_and_records_it(capturable_on_the_cpu, mini_root, tmp_path,
                                                                        capsys, cli):
    """A run whose capture fails trains to the end on the plain step; one line says so, and the
    checkpoint records it beside the run's command line, where `inspect` shows it."""
    argv = ["train", "--batch-size", "4", "--stride", "7", "--num-epoch", "1", "--ema-decay", "0.9",
            "--cuda-graph", "auto", "--data-root", str(mini_root), "--checkpoint-dir", str(tmp_path)]
    args = vars(train.build_parser()[0].parse_args(argv))
    trainer = train.Trainer(args, Processes(torch.device("cpu")), command="python train.py " + " ".join(argv))
    capturable(trainer.optimizer)  # as choose_step sets a CUDA run up
    trainer.captured = EagerCapture(trainer.model, trainer.optimizer, trainer.ema, args, trainer.autocast,
                                    trainer.scaler, replays=failing_capture)
    assert trainer.run() == 0
    said = [line for line in re.split("[\r\n]", capsys.readouterr().err) if line.startswith("CUDA step")]
    assert said == ["CUDA step: plain from epoch 1 on; the capture failed: RuntimeError: CUDA error: operation not "
                    "permitted when stream is capturing"]
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["commands"][-1]["step"] == said[0] and state["args"]["cuda_graph"] == "auto"
    assert state["epoch"] == 1 and isinstance(state["optimizer"]["param_groups"][0]["lr"], float)
    shown = cli("train", "inspect", str(tmp_path / "last.pth")).stdout
    assert said[0] in shown and "cuda_graph     auto" in shown


def test_moved_alike_measures_each_change_against_the_plain_ones():
    before = {"w": torch.zeros(3)}
    plain = {"w": torch.tensor([1e-3, -2e-3, 0.0])}
    assert moved_alike(before, {"w": plain["w"] * 1.005}, plain) is None
    assert "w moved" in moved_alike(before, {"w": plain["w"] * 1.02}, plain)
    assert "missing" in moved_alike(before, {}, plain)
    assert moved_alike({"s": torch.tensor(3.0)}, {"s": torch.tensor(4.0)}, {"s": torch.tensor(4.0)}) is None
    assert moved_alike({"s": torch.tensor(3.0)}, {"s": torch.tensor(5.0)}, {"s": torch.tensor(4.0)}) is not None


def test_capture_is_off_unless_asked_for_and_never_with_the_host_reads_it_cannot_hold():
    cuda, args = torch.device("cuda"), {"amp": "off", "cuda_graph": "auto"}
    assert CapturedStep.possible(args, cuda, 1) is None
    assert "--cuda-graph off" in CapturedStep.possible({"amp": "off"}, cuda, 1)  # a checkpoint from before the flag
    assert "--cuda-graph off" in CapturedStep.possible({**args, "cuda_graph": "off"}, cuda, 1)
    assert "several processes" in CapturedStep.possible(args, cuda, 2)
    assert "fp16" in CapturedStep.possible({**args, "amp": "fp16"}, cuda, 1)
    assert CapturedStep.possible(args, torch.device("cpu"), 1) == "not CUDA"


def test_plain_adam_undoes_capturable():
    model = SRCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(1, 3, 12, 12)).sum().backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    capturable(optimizer)
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    plain_adam(optimizer)
    again = optimizer.state_dict()
    lr = again["param_groups"][0].pop("lr")  # held as a float32 tensor in between: 1e-3 to float32's precision
    assert isinstance(lr, float) and lr == pytest.approx(saved["param_groups"][0].pop("lr"), rel=1e-7)
    assert again["param_groups"] == saved["param_groups"]
    for key, state in saved["state"].items():
        for name, value in state.items():
            assert torch.equal(again["state"][key][name], value) and again["state"][key][name].device == value.device


# ---------------------------------------------------------------- the plain step


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_a_step_in_passes_is_the_whole_batch_step(bf16):
    """The same update in passes as whole, in float32 and under bf16 autocast (within its rounding)."""
    torch.manual_seed(0)
    inputs, targets = torch.rand(2, 8, 3, 20, 20)
    results = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)
    for size in (None, 3):  # 8 patches whole, and in three passes of equal size: 3, 3 and 2
        torch.manual_seed(1)
        model = SRCNN()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the gradient, scale and all
        sizes = []
        model.register_forward_pre_hook(lambda module, args, sizes=sizes: sizes.append(len(args[0])))
        loss = train_step(model, optimizer, inputs, targets, autocast, torch.amp.GradScaler("cpu", enabled=False),
                          pass_patches=size)
        results.append((loss, [p.detach().clone() for p in model.parameters()], sizes))
    (whole_loss, whole, whole_sizes), (passed_loss, passed, passed_sizes) = results
    assert whole_sizes == [8] and passed_sizes == [3, 3, 2]
    assert torch.allclose(whole_loss, passed_loss, rtol=1e-2 if bf16 else 1e-5)
    for a, b in zip(whole, passed, strict=True):
        assert torch.allclose(a, b, rtol=2e-2 if bf16 else 0, atol=1e-4 if bf16 else 1e-6)


def test_the_cpu_pass_is_equal_passes_of_about_35k_pixels():
    """16 of 48x48 (36,864 pixels) in one pass, 128 of 33x33 as 4 of 32, 8 of 96x96 as 4 + 4, 24 of
    48x48 as 2 of 12 (not 15 + 9), and one patch larger than a pass alone."""
    sizes = ((48, 16), (33, 128), (96, 8), (48, 24), (256, 4))
    assert [cpu_pass(size, batch) for size, batch in sizes] == [16, 32, 4, 12, 1]


def test_the_last_layer_runs_by_phase_only_where_it_measured_faster(monkeypatch):
    """AVX-512's blocks of 16 output channels in float32; not with AVX2, not on a GPU; in bf16 not on
    AMX (plain measured faster there), and float32's choice where bf16 is unmeasured (AVX512_BF16)."""
    import step

    for capability, native, on_cpu, in_bf16 in (("AVX512", "AMX", True, False), ("AVX512", "AVX512_BF16", True, True),
                                                ("AVX2", None, False, False), ("DEFAULT", None, False, False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(step, "native_bf16", lambda n=native: n)
        assert last_layer_by_phase(torch.device("cpu")) is on_cpu
        assert last_layer_by_phase(torch.device("cpu"), bf16=True) is in_bf16
        assert last_layer_by_phase(torch.device("cuda")) is last_layer_by_phase(torch.device("cuda"), True) is False


def test_amp_bf16_trains_in_bf16_on_a_cpu_that_computes_it_and_says_why_not_elsewhere(monkeypatch, capsys):
    """--amp bf16: bf16 autocast on a CPU with AMX or AVX512_BF16; elsewhere one note and float32 (an
    emulated bf16 runs several times slower), so that a recipe asking for bf16 runs everywhere."""
    import step

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in ("AMX", "AVX512_BF16", None):
        monkeypatch.setattr(step, "native_bf16", lambda n=native: n)
        autocast, scaler = mixed_precision({"amp": "bf16"}, cpu)
        assert step.precision(autocast) == ("bf16" if native else "float32") and not scaler.is_enabled()
        assert ("does not compute bfloat16 natively" in capsys.readouterr().err) == (native is None)
    assert step.precision(mixed_precision({"amp": "fp16"}, cpu)[0]) == "float32"
    assert "fp16 applies to CUDA only" in capsys.readouterr().err
    assert step.precision(mixed_precision({"amp": "off"}, cpu)[0]) == "float32" and not capsys.readouterr().err
    assert step.autocast_dtype({"amp": "fp16"}, cuda) == torch.float16
    assert step.autocast_dtype({"amp": "bf16"}, cuda) == torch.bfloat16


@pytest.mark.parametrize("luma", [False, True])
def test_the_captured_steps_batch_is_make_batchs_for_every_transform(luma):
    """CUDA graphs replay the same operations every time: the flip/rotation is a gather whose order
    is picked on the device, and gives make_batch's batch value for value."""
    patches = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    table = transform_table(12)
    for transform in range(8):
        expected = make_batch(patches, patches, transform, luma)[0]
        got = graph_batch(patches, table, torch.tensor(transform), luma)
        assert torch.equal(got, expected) and got.is_contiguous(memory_format=torch.channels_last)


def test_a_capturable_adams_state_is_saved_as_a_plain_adams():
    model = SRCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(1, 3, 12, 12)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    state["param_groups"][0].update(lr=torch.tensor(2e-4), capturable=True)  # as train.capturable leaves it
    plain = plain_adam_state(state)
    assert plain["param_groups"][0]["lr"] == pytest.approx(2e-4) and not plain["param_groups"][0]["capturable"]
    other = SRCNN()
    again = torch.optim.Adam(other.parameters(), lr=1e-3)
    again.load_state_dict(plain)
    other(torch.rand(1, 3, 12, 12)).sum().backward()
    again.step()  # a plain Adam on the CPU takes it
    assert isinstance(again.param_groups[0]["lr"], float)


def test_moving_average_moves_toward_the_weights_by_one_minus_decay():
    model, ema = SRCNN(), SRCNN()
    before = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, model, decay=0.75, step=1000)
    for average, old, weight in zip(ema.parameters(), before, model.parameters(), strict=True):
        assert torch.allclose(average, 0.75 * old + 0.25 * weight)


def test_moving_average_forgets_the_initial_weights_in_its_first_steps():
    model, ema = SRCNN(), SRCNN()
    before = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, model, decay=0.999, step=0)  # (1 + 0) / (10 + 0): 90% of the way to the weights
    for average, old, weight in zip(ema.parameters(), before, model.parameters(), strict=True):
        assert torch.allclose(average, 0.1 * old + 0.9 * weight)


def test_optimizer_steps_counts_adams_steps():
    model = SRCNN()
    optimizer = torch.optim.Adam(model.parameters())
    assert optimizer_steps(optimizer) == 0
    for _ in range(3):
        model(torch.rand(1, 3, 8, 8)).mean().backward()
        optimizer.step()
    assert optimizer_steps(optimizer) == 3
