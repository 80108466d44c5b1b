"""The processes a run trains with: one, or those torchrun starts (DistributedDataParallel).
Their device, how they split each batch, the collectives through which they agree, and stop
signals."""

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from utils import UserError, choose_device

T = TypeVar("T")


def process_group_backend(device: torch.device) -> str:
    """gloo for CPU tensors always, and NCCL (which takes CUDA tensors only) for CUDA tensors: no
    collective can be handed a tensor its backend cannot take."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def reuse_freed_memory() -> None:
    """Have glibc's malloc keep freed blocks of up to 32 MiB for reuse (it hands back no more than
    64 MiB of free heap) instead of returning each to the kernel: every training step allocates and
    frees activations of a few MB, and each one returned was mapped afresh and faulted in page by
    page at the next step. glibc settles on these values by itself once it has freed a block of
    32 MiB, as reading T91 in the training process does; with a streamed set, which worker
    processes read, it never did, and every step faulted its activations in afresh (docs/training.md).
    Nothing happens on another C library."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 64 << 20)


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks training to stop at the next check, saving first; a second
    signal stops at once (checkpoints already written stay intact: writes are atomic)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict = {}

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print("\nstopping within a few batches, saving first (signal again to stop at once)", file=sys.stderr)

    def __enter__(self) -> "StopRequest":
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup'ed runs keep ignoring SIGINT
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class Processes:
    """This process's device and place among `world` processes. Every collective tensor lives on
    `device`; process 0 ("main") alone evaluates, prints and writes checkpoints."""

    def __init__(self, device: torch.device, rank: int = 0, world: int = 1) -> None:
        self.device, self.rank, self.world = device, rank, world
        self.main = rank == 0

    @classmethod
    def start(cls, cuda: bool, batch_size: int) -> "Processes":
        """One process, or under torchrun (WORLD_SIZE > 1) this one joined to the others."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        device = choose_device(cuda)
        reuse_freed_memory()
        if world == 1:
            return cls(device)
        if batch_size % world:
            raise UserError(f"--batch-size {batch_size} must be a multiple of the {world} processes")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group(process_group_backend(device), device_id=device if device.type == "cuda" else None)
        return cls(device, dist.get_rank(), world)

    def __str__(self) -> str:
        return f"{self.device} x {self.world} process(es)"

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.world == 1:
            return
        if peer_failure(error):  # the group is broken: leave it as it is
            first_line = str(error).strip().splitlines()[0][:200]
            raise UserError(f"another training process failed ({first_line}); this one stopped without "
                            "writing a checkpoint") from None
        if error is None or isinstance(error, UserError):  # all processes got here, and agree on the error
            dist.barrier()  # tear the group down together, never while another process still uses it
        dist.destroy_process_group()

    def say(self, text: str) -> None:
        if self.main:
            print(text, file=sys.stderr)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as the training step drives it: DDP, which averages gradients, under several processes."""
        if self.world == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def share(self, count: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
        """This process's part of every batch of an epoch, as indices on the device: one shuffled
        order for all processes (DistributedSampler), each batch split evenly between them."""
        sampler = DistributedSampler(range(count), self.world, self.rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return list(torch.tensor(list(sampler), device=self.device).split(batch_size // self.world))

    def check(self, loss_sum: torch.Tensor, signum: int | None) -> tuple[float, int | None]:
        """(the loss summed over all processes, a stop signal any of them got): what they must agree
        on to go on together. It reads the device's result: one host synchronisation."""
        if self.world == 1:
            return loss_sum.item(), signum
        total, flag = loss_sum.clone(), torch.tensor(signum or 0, device=self.device)
        dist.all_reduce(total)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return total.item(), int(flag) or None

    def from_main(self, action: Callable[..., T], *args) -> T:
        """Run `action(*args)` in process 0 alone; every process returns its result (plain data)."""
        result = [action(*args) if self.main else None]
        if self.world > 1:
            dist.broadcast_object_list(result, src=0)
        return result[0]

    def agree(self, action: Callable[..., T], *args) -> T:
        """Run `action(*args)` here; a user error in any process ends every process with that error."""
        try:
            result, error = action(*args), None
        except UserError as err:
            result, error = None, str(err)
        if self.world > 1:
            errors: list = [None] * self.world
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise UserError(error)
        return result


def peer_failure(error: BaseException | None) -> bool:
    """Whether `error` is a collective that broke because another process ended (gloo, NCCL)."""
    words = ("gloo", "NCCL", "Connection", "connection", "peer")
    return isinstance(error, dist.DistError) or isinstance(error, RuntimeError) and any(w in str(error) for w in words)
