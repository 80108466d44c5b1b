"""How one training step runs on this device: a batch's uint8 patches made float (make_batch), one
MSE/Adam update on them (train_step) in the passes a CPU keeps in cache (cpu_pass) or all at once
on a GPU, under the forward pass's mixed precision (mixed_precision), then the moving average
(update_ema). On one CUDA device the same step may be captured as a CUDA graph (CapturedStep,
--cuda-graph auto): it is checked against the plain step at capture and falls back to it on any
fault, so a run never trains on an update the plain step would not make."""

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import plain_adam_state
from data import rgb_to_y

PASS_PIXELS = 35_000  # patch pixels per forward/backward pass on a CPU (see cpu_pass)
# How far a captured step's changes may stray from the plain step's, as a share of the plain change:
# TF32 convolutions keep 10-bit mantissas (about 1e-3 relative per product) in both; a wrong
# learning rate, decay, flip or stale buffer moves a weight by far more.
CAPTURE_RTOL = 1e-2
# --amp bf16 on a CPU trains in bf16 only if its probed step is at least this much faster than float32's:
# a margin, so that a probe's jitter does not flip the choice between runs of the same command
BF16_GAIN = 1.1


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
               autocast: torch.autocast, scaler: torch.amp.GradScaler, border: int = 0,
               pass_patches: int | None = None) -> torch.Tensor:
    """One MSE/Adam update on a batch; its loss (`border` pixels in from the patch edges) as a tensor
    on the device, so that nothing waits for the device. The batch passes through the network in
    passes of equal size (within one patch), at most `pass_patches` each, with the gradients summed:
    the same update, but on a CPU the activations stay in cache (see cpu_pass); None = all at once
    (the GPU's way). `autocast`: the forward pass's mixed-precision context and `scaler` the fp16
    loss scaler, both disabled but for --amp (mixed_precision)."""
    optimizer.zero_grad(set_to_none=True)
    passes = -(-len(inputs) // (pass_patches or len(inputs)))
    pairs = list(zip(inputs.tensor_split(passes), targets.tensor_split(passes), strict=True))
    total = torch.zeros((), device=inputs.device)
    for i, (x, y) in enumerate(pairs):
        last = i == len(pairs) - 1  # DDP averages gradients across processes once, after the last pass
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast:
                out = model(x)
            out = out.float()
            if border:
                out, y = out[..., border:-border, border:-border], y[..., border:-border, border:-border]
            loss = F.mse_loss(out, y) * (len(x) / len(inputs))
            scaler.scale(loss).backward()
        total += loss.detach()
    scaler.step(optimizer)
    scaler.update()
    return total


def cpu_pass(patch_size: int, batch_size: int) -> int:
    """Patches per forward/backward pass on a CPU: passes of about 35k pixels, of equal size
    (16 patches of 48x48 in one pass, 128 of 33x33 as 4 of 32, 8 of 96x96 as 4 + 4), so that a pass's
    activations stay in cache: with freed memory reused, as training does (processes.reuse_freed_memory),
    a wide range of pass sizes around it ran the step equally fast, much smaller passes and the whole
    batch slower (docs/speed.md, "The step as it is now, per kind of machine"). The same on every
    CPU, so that the same command trains the same weights wherever the CPU computes the same sums."""
    passes = max(1, round(batch_size * patch_size**2 / PASS_PIXELS))
    return -(-batch_size // passes)


def last_layer_by_phase(device: torch.device, bf16: bool = False) -> bool:
    """Whether training computes the last layer by phase (model.conv_by_phase): where it ran the step
    faster, on a CPU with AVX-512, whose float32 convolutions fill blocks of 16 output channels; not
    with AVX2 (blocks of 8), nor on a GPU, which has no such blocks; in bf16 with AVX512_BF16 alone
    as in float32, but with AMX's tiles the plain layer is the faster (docs/speed.md, "Where the
    step's time goes" and "bf16 on the CPU")."""
    if device.type != "cpu" or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    return not (bf16 and native_bf16() == "AMX")


def native_bf16() -> str | None:
    """How this CPU computes bfloat16 natively: "AMX" (the tiles of recent Intel CPUs), "AVX512_BF16"
    (dot products in the vector units), or None: then PyTorch emulates it, several times slower than
    float32. Native is not always faster (bf16_probe decides)."""
    probes = (("AMX", "_is_amx_tile_supported"), ("AVX512_BF16", "_is_avx512_bf16_supported"))
    return next((name for name, probe in probes if getattr(torch.cpu, probe, lambda: False)()), None)


def make_batch(inputs: torch.Tensor, targets: torch.Tensor, transform: int,
               luma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's uint8 RGB patches -> float [0, 1] on their device, under one of the 8 flips/rotations
    (0 = none); with `luma`, their Y channel (the metric's, / 255) for a Y network."""
    pair = []
    for source in (inputs, targets):
        x = source.float()
        x = rgb_to_y(x).unsqueeze(-3).div_(255) if luma else x.div_(255)
        if transform & 4:
            x = x.flip(-1)
        if transform & 3:  # rot90 copies even by 0 turns
            x = x.rot90(transform & 3, (-2, -1))
        pair.append(x.contiguous(memory_format=torch.channels_last))
    return pair[0], pair[1]


def transform_table(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """8 x size² pixel orders: row t, gathered from a size x size patch's pixels, gives make_batch's
    flip/rotation t of it, value for value. A gather of a row picked on the device keeps the batch's
    operations the same for all eight, as a CUDA graph needs."""
    grid = torch.arange(size * size, device=device).view(size, size)
    return torch.stack([(grid.flip(-1) if t & 4 else grid).rot90(t & 3, (-2, -1)).flatten() for t in range(8)])


def graph_batch(source: torch.Tensor, table: torch.Tensor, transform: torch.Tensor, luma: bool) -> torch.Tensor:
    """make_batch's float batch of the uint8 patches `source`, value for value, its flip/rotation
    given as a tensor on the device (`transform`, a row of transform_table's `table`)."""
    x = source.float()
    x = rgb_to_y(x).unsqueeze(-3).div_(255) if luma else x.div_(255)
    order = table.index_select(0, transform.view(1)).view(-1)
    return x.flatten(-2).index_select(-1, order).view(x.shape).contiguous(memory_format=torch.channels_last)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate; one held as a tensor on the GPU (CapturedStep) is filled in place."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int | torch.Tensor) -> None:
    """ema <- d * ema + (1 - d) * model, weight by weight: an average over the last ~1 / (1 - decay)
    steps, steadier than the last step's weights. Before `step` (the optimizer steps taken) nears
    1 / (1 - decay), d = (1 + step) / (10 + step) instead, as in TensorFlow's ExponentialMovingAverage,
    so that the average forgets the initial weights within the first steps.

    `step` may be Adam's count as a tensor on the device (a captured step's): d is then computed
    there in float64, as Python computes it from a number, and each weight's lerp takes it as a
    tensor, so the update is the same and nothing is read back to the host."""
    if isinstance(step, torch.Tensor):
        step = step.double()
        weight = (1 - torch.clamp((1 + step) / (10 + step), max=decay)).float()
    else:
        weight = 1 - min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for average, current in zip(ema.parameters(), model.parameters(), strict=True):
            average.lerp_(current, weight)


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """The steps Adam has taken, kept in its state and so in every checkpoint."""
    first = optimizer.param_groups[0]["params"][0]
    return int(optimizer.state[first]["step"]) if first in optimizer.state else 0


def autocast_dtype(args: dict, device: torch.device) -> torch.dtype | None:
    """The forward pass's autocast precision for --amp on `device`: bf16 or fp16 on CUDA; bf16 on a CPU
    that computes it natively and whose probe (bf16_probe, recorded in args) found it faster; None
    (float32) otherwise, said in one line when --amp asked for more."""
    amp = args.get("amp", "off")
    if amp == "off":
        return None
    if device.type == "cuda":
        return torch.float16 if amp == "fp16" else torch.bfloat16
    probe = args.get("bf16_probe")
    if amp == "bf16" and native_bf16() and (probe is None or bf16_faster(probe)):
        return torch.bfloat16
    if amp == "fp16":
        why = "--amp fp16 applies to CUDA only"
    elif native_bf16():
        why = f"--amp bf16 is not faster on this CPU ({probe_figures(probe)})"
    else:
        why = "this CPU does not compute bfloat16 natively (neither AVX512_BF16 nor AMX), where it runs slower"
    print(f"note: {why}; training on the CPU in float32", file=sys.stderr)
    return None


def needs_bf16_probe(args: dict, device: torch.device) -> bool:
    """Whether this run must time its step in both precisions before it trains: --amp bf16 on a CPU that
    computes bfloat16 natively, with no probe recorded (a resumed run keeps its run's choice)."""
    return device.type == "cpu" and args.get("amp") == "bf16" and native_bf16() is not None \
        and args.get("bf16_probe") is None


def bf16_probe(model: nn.Module, batch_size: int, patch_size: int, pass_patches: int, border: int,
               repeats: int = 3) -> dict[str, float]:
    """Milliseconds of this run's step (a copy of its network; its batch, patch size and passes; random
    patches) in float32 and in bf16, each the best of `repeats` timed alternately after one untimed
    step: a CPU's flags do not say whether its bf16 is faster (on one that reports AVX512_BF16 without
    AMX it was slower, docs/speed.md). Nothing of the run is touched: not its weights, not its random
    numbers."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, model.shape.channels, patch_size, patch_size)
    x, y = (torch.rand(shape, generator=generator).contiguous(memory_format=torch.channels_last) for _ in "xy")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    best = {"float32": math.inf, "bf16": math.inf}
    runs = {}  # each precision's copy of the network, its Adam and its autocast
    for name in best:
        probe_model = copy.deepcopy(model)
        probe_model.last_layer_by_phase = last_layer_by_phase(torch.device("cpu"), name == "bf16")
        runs[name] = (probe_model, torch.optim.Adam(probe_model.parameters()),
                      torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16", cache_enabled=False))
    for round_ in range(repeats + 1):
        for name, (probe_model, optimizer, autocast) in runs.items():
            start = time.perf_counter()
            train_step(probe_model, optimizer, x, y, autocast, scaler, border, pass_patches)
            if round_:  # the first round sets up each precision's kernels and Adam's state
                best[name] = min(best[name], (time.perf_counter() - start) * 1000)
    return {"float32_ms": round(best["float32"], 2), "bf16_ms": round(best["bf16"], 2)}


def bf16_faster(probe: dict) -> bool:
    """Whether a probe found bf16 worth taking: at least BF16_GAIN times float32's speed."""
    return probe["float32_ms"] >= BF16_GAIN * probe["bf16_ms"]


def probe_figures(probe: dict | None) -> str:
    """A probe's figures as a run prints and records them."""
    if probe is None:
        return "not probed"
    return f"probed: a step {probe['bf16_ms']:.1f} ms in bf16 against {probe['float32_ms']:.1f} in float32"


def mixed_precision(args: dict, device: torch.device) -> tuple[torch.autocast, torch.amp.GradScaler]:
    """(the forward pass's autocast, the loss scaler) for --amp (autocast_dtype): bf16 autocast, or fp16
    autocast with a loss scaler on CUDA; both present and disabled in float32. The loss, the weights,
    Adam and the moving average stay float32 either way."""
    dtype = autocast_dtype(args, device)
    # no autocast cache: each weight is cast once a pass anyway, and a CUDA graph cannot capture the cache
    return (torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None, cache_enabled=False),
            torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


def precision(autocast: torch.autocast) -> str:
    """The forward pass's precision under `autocast`, as a run prints and records it."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast.fast_dtype] if autocast._enabled else "float32"


def capturable(optimizer: torch.optim.Optimizer) -> None:
    """Make a (loaded) Adam capturable in place: its learning rate a tensor on the weights' device, and
    its step counts there too. checkpoint.plain_adam_state saves it as a plain Adam again."""
    device = optimizer.param_groups[0]["params"][0].device
    for group in optimizer.param_groups:
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
    for state in optimizer.state.values():
        state["step"] = state["step"].to(device=device, dtype=torch.float32)


def plain_adam(optimizer: torch.optim.Optimizer) -> None:
    """capturable's inverse, in place: a plain Adam again, as train_step takes it (its learning rate
    a number, its step counts on the CPU), with the same moments."""
    for group in optimizer.param_groups:
        group["capturable"] = False
        group["lr"] = float(group["lr"])
    for state in optimizer.state.values():
        state["step"] = state["step"].cpu()


def state_tensors(model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """What a step changes, by name: the weights, the moving average, Adam's moments and step counts."""
    tensors = {f"weight {name}": value for name, value in model.named_parameters()}
    if ema is not None:
        tensors |= {f"average {name}": value for name, value in ema.named_parameters()}
    for name, value in model.named_parameters():
        for key, held in optimizer.state.get(value, {}).items():
            tensors[f"Adam {key} {name}"] = held
    return tensors


def moved_alike(before: dict[str, torch.Tensor], captured: dict[str, torch.Tensor],
                plain: dict[str, torch.Tensor], rtol: float = CAPTURE_RTOL) -> str | None:
    """None if every tensor changed in the captured step as in the plain one, within `rtol` of the
    plain change's size; else which did not, and by how much."""
    for name, start in before.items():
        if name not in captured or name not in plain:
            return f"{name} is missing from the {'captured' if name not in captured else 'plain'} step's state"
        start, ours, theirs = (t.detach().double().cpu() for t in (start, captured[name], plain[name]))
        expected = theirs - start
        off = (ours - theirs).abs().max().item()
        allowed = rtol * expected.abs().max().item()
        if not off <= allowed:
            return f"{name} moved {off:.3g} away from the plain step's change (at most {allowed:.3g} allowed)"
    return None


class CapturedStep:
    """The step on one CUDA device as a CUDA graph, captured once and replayed for every batch of the
    full batch size: a batch's uint8 patches are copied into the graph's input buffers, and the
    replay does the rest on the GPU with no Python and no wait for the host: the conversion to float,
    the flip/rotation (a gather by transform_table, the same operations for all eight), train_step's
    forward, backward and Adam (capturable, its learning rate a tensor on the GPU), and update_ema
    (its decay computed from Adam's step count on the GPU). Batches of another size (an epoch's last)
    take the plain step; the first WARMUP batches run eagerly on a side stream, as CUDA graphs need.

    Trusted only once checked: the batch after the warm-up is captured, replayed, and compared with
    the plain step (make_batch, train_step with a plain Adam, update_ema) run on copies from the same
    state; on a mismatch, or any error while capturing, the state is put back as it was, `failure`
    says why, and the caller takes the plain step from then on. Why capture at all: at the recipe's
    batch of 16, the plain step kept an H200 waiting on Python and kernel launches (docs/gpus.md)."""

    WARMUP = 3

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None, args: dict,
                 autocast: torch.autocast, scaler: torch.amp.GradScaler) -> None:
        self.model, self.optimizer, self.ema, self.args = model, optimizer, ema, args
        self.autocast, self.scaler = autocast, scaler
        self.device = next(model.parameters()).device
        self.table = transform_table(args["patch_size"], self.device)
        self.transform = torch.zeros((), dtype=torch.long, device=self.device)
        self.inputs: torch.Tensor | None = None  # the graph's input buffers, made by the first batch
        self.targets: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None  # the graph's output, set by the capture
        self.replay: Callable[[], None] | None = None  # set once a capture has passed the check
        self.failure: str | None = None  # why the captured step was given up (None: it was not)
        self.warmed = 0

    @staticmethod
    def possible(args: dict, device: torch.device, world: int) -> str | None:
        """Why the step is not captured here (None: it is)."""
        if device.type != "cuda":
            return "not CUDA"
        if args.get("cuda_graph", "off") == "off":
            return "--cuda-graph off"
        if world > 1:
            return "several processes: DDP's gradient averaging is left uncaptured"
        if args["amp"] == "fp16":
            return "--amp fp16: the loss scaler reads its overflow check on the host every step"
        return None

    def body(self) -> torch.Tensor:
        """One step on the input buffers: what the graph holds. Nothing in it may read a tensor back
        to the host (tests/test_step.py runs it on the CPU under a mode that fails on any such read)."""
        luma = self.model.shape.channels == 1
        x, y = (graph_batch(source, self.table, self.transform, luma) for source in (self.inputs, self.targets))
        loss = train_step(self.model, self.optimizer, x, y, self.autocast, self.scaler, self.args["loss_border"])
        if self.ema is not None:
            update_ema(self.ema, self.model, self.args["ema_decay"],
                       self.optimizer.state[next(self.model.parameters())]["step"])
        return loss

    def load(self, inputs: torch.Tensor, targets: torch.Tensor, transform: int) -> None:
        """Copy a batch and its flip/rotation into the graph's buffers (made by the first batch)."""
        if self.inputs is None:
            self.inputs, self.targets = torch.empty_like(inputs), torch.empty_like(targets)
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        self.transform.fill_(transform)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, transform: int) -> torch.Tensor | None:
        """The step on these patches under flip/rotation `transform`; its loss (mean over the batch) on
        the device, or None once `failure` is set: the caller then takes the plain step. The learning
        rate is the optimizer's tensor, set before (set_learning_rate)."""
        if self.failure is not None:
            return None
        self.load(inputs, targets, transform)
        if self.replay is not None:
            self.replay()
            return self.loss
        if self.warmed < self.WARMUP:
            with self.side_stream():
                loss = self.body()
            self.warmed += 1
            return loss
        return self.capture_and_check(inputs, targets, transform)

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        """Eager warm-up steps on a side stream, so that the capture finds everything set up."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream(self.device).wait_stream(side)

    def record(self) -> Callable[[], None]:
        """Capture body() as a CUDA graph (recorded, not run) and return what replays it."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.loss = self.body()
        return graph.replay

    def capture_and_check(self, inputs: torch.Tensor, targets: torch.Tensor, transform: int) -> torch.Tensor | None:
        """Capture, replay once on this batch, and keep the graph only if the step it made is the plain
        step's on copies of the same state; otherwise put the state back and give the capture up."""
        lr = float(self.optimizer.param_groups[0]["lr"])
        before = {name: t.detach().clone() for name, t in state_tensors(self.model, self.ema, self.optimizer).items()}
        reference = (copy.deepcopy(self.model), copy.deepcopy(self.ema), copy.deepcopy(self.optimizer.state_dict()))
        try:
            replay = self.record()
            replay()
            captured = {name: t.detach().clone() for name, t in state_tensors(self.model, self.ema,
                                                                                self.optimizer).items()}
        except Exception as error:  # whatever the capture raised, the plain step stands
            first_line = next(iter(str(error).splitlines()), "")
            self.give_up(before, f"the capture failed: {type(error).__name__}: {first_line}".rstrip(": "))
            return None
        model, ema, adam_state = reference
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        optimizer.load_state_dict(plain_adam_state(adam_state))
        plain_adam(optimizer)
        x, y = make_batch(inputs, targets, transform, model.shape.channels == 1)
        train_step(model, optimizer, x, y, self.autocast, self.scaler, self.args["loss_border"])
        if ema is not None:
            update_ema(ema, model, self.args["ema_decay"], optimizer_steps(optimizer))
        mismatch = moved_alike(before, captured, state_tensors(model, ema, optimizer))
        if mismatch is not None:
            self.give_up(before, f"the captured step differs from the plain one: {mismatch}")
            return None
        self.replay = replay
        return self.loss

    def give_up(self, before: dict[str, torch.Tensor], why: str) -> None:
        """Put the weights, the average and Adam's state back as `before`, make Adam plain again, and
        say in `failure` why."""
        with torch.no_grad():
            for name, tensor in state_tensors(self.model, self.ema, self.optimizer).items():
                tensor.copy_(before[name])
        plain_adam(self.optimizer)
        self.failure = why
