"""Training sets larger than memory (--data-memory): each epoch takes the images in a new shuffled
order, a part at a time (as many as half the budget holds), the next part read and degraded by
DataLoader workers (--workers) while one trains, so that the two stay within the budget; the
patches of a part are drawn in a shuffled order. An epoch is still every image's patch grid once.

Under torchrun every process draws the same plan, and each part's images are dealt out between
the processes, so that each reads and holds only its own share (disjoint, of about equal patch
counts); a process whose share of a part has fewer patches repeats some of them, as
DistributedSampler does, so that all take the same number of steps."""

import bisect
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset

from data import (
    DEGRADATIONS,
    TrainingPatches,
    degrade,
    image_to_tensor,
    load_image,
    load_rgb,
    shrink,
    training_images,
)
from utils import UserError

if TYPE_CHECKING:
    from processes import Processes


def leave_ctrl_c_to_training(worker: int) -> None:
    """A reading worker ignores Ctrl-C, which the terminal sends to every process of the run: the
    training process then stops at its next check, saving first, and may still read a part."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Decoded(Dataset):
    """Each image decoded whole and dropped, per item: None, or the one line that says why it cannot
    be read (a file whose header reads may still be broken further on)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str | None:
        try:
            load_image(self.paths[i])
        except UserError as err:
            return str(err)
        return None


class Entries(Dataset):
    """One image at one zoom, degraded in one way, per item: (input, target) uint8 3 x H x W."""

    def __init__(self, entries: list[tuple[Path, float]], kinds: list[int], scale: int) -> None:
        self.entries, self.kinds, self.scale = entries, kinds, scale

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | str:
        """The pair, or the one line that says why the image cannot be read: the training process
        raises it (a worker's own exception would reach it wrapped in the worker's traceback)."""
        path, zoom = self.entries[i]
        try:
            lr_up, hr = degrade(shrink(load_rgb(path), zoom), self.scale, DEGRADATIONS[self.kinds[i]])
        except UserError as err:
            return str(err)
        return image_to_tensor(lr_up), image_to_tensor(hr)


class StreamedPatches:
    """The patches of folders too large for memory, as TrainingPatches gives them (new_epoch,
    batches, take, len), but held a part at a time: the patches of an epoch are numbered part by
    part, and a batch never spans two parts (a part's last batch may be smaller). Process `rank` of
    `world` numbers and holds only its share of each part; len counts every process's patches."""

    def __init__(self, folders: Sequence[Path], scale: int, patch_size: int, stride: int, zooms: Sequence[float],
                 device: torch.device | str, degradation: str, budget: int, workers: int,
                 rank: int = 0, world: int = 1) -> None:
        self.scale, self.patch_size, self.stride, self.device, self.workers = scale, patch_size, stride, device, workers
        self.rank, self.world = rank, world
        self.kinds = len(DEGRADATIONS) if degradation == "mixed" else 1
        self.default_kind = DEGRADATIONS.index(degradation) if degradation != "mixed" else 0
        held = [(path, zoom, size) for path, zoom, size in training_images(folders, scale, zooms)
                if min(size) >= patch_size]  # every image at every zoom that holds a patch
        self.entries, self.sizes = [(path, zoom) for path, zoom, _ in held], [size for _, _, size in held]
        if not self.entries:
            raise UserError(f"every training image in {', '.join(map(str, folders))} is smaller than the patch "
                            f"size {patch_size}")
        if len(self.entries) < world:
            raise UserError(f"{len(self.entries)} training images (at every zoom) for {world} processes: "
                            "each process streams images of its own, so use fewer processes")
        largest = max(3 * width * height * (1 + self.kinds) for width, height in self.sizes)
        if budget < largest:  # less than one image's worth: no part could hold anything
            raise UserError(f"--data-memory of {budget / 1e3:,.0f} KB is too little for these training images: "
                            f"at least {largest / 1e3:,.0f} KB, what the largest of them takes")
        self.budget = budget
        self.loaded: tuple[int, TrainingPatches] | None = None  # the part held now
        self.stream: Iterator | None = None
        self.new_epoch(torch.Generator().manual_seed(0), move_grid=False)

    def check_images(self) -> tuple[int, float]:
        """Decode every image of this process's share once, in the workers, an image at a time each;
        training calls it before its first step, so that a broken file ends the run in one line then,
        not hours into an epoch. (images checked, seconds taken)."""
        start = time.perf_counter()
        paths = list(dict.fromkeys(path for path, _ in self.entries))[self.rank::self.world]
        for problem in DataLoader(Decoded(paths), batch_size=None, num_workers=self.workers,
                                  worker_init_fn=leave_ctrl_c_to_training):
            if problem is not None:
                raise UserError(f"{problem}; found in a check of every training image before training")
        return len(paths), time.perf_counter() - start

    def grid(self, size: tuple[int, int], offset: int) -> int:
        """How many patches the grid at `offset` lays in an image of `size`, as TrainingPatches.place does."""
        width, height = size
        o = offset if min(width, height) >= self.patch_size + offset else 0
        return ((height - o - self.patch_size) // self.stride + 1) * ((width - o - self.patch_size) // self.stride + 1)

    def new_epoch(self, generator: torch.Generator, move_grid: bool) -> None:
        """Draw this epoch: the grid's offset, each image's degradation if mixed, the order of the
        images, their parts (consecutive images within the budget) and each part's order of patches."""
        self.offset = int(torch.randint(self.stride, (1,), generator=generator)) if move_grid else 0
        count = len(self.entries)
        kinds = (torch.randint(self.kinds, (count,), generator=generator).tolist() if self.kinds > 1
                 else [self.default_kind] * count)
        order = torch.randperm(count, generator=generator).tolist()
        parts, part, held = [], [], 0
        for i in order:
            width, height = self.sizes[i]
            size = 6 * width * height  # the input and the target, 8-bit RGB
            # each process holds its share of the part trained on and of the next, read meanwhile
            if len(part) >= self.world and held + size > self.world * (self.budget // 2):
                parts.append(part)
                part, held = [], 0
            part.append(i)
            held += size
        if len(part) < self.world:  # too few to deal one to each process: the last part takes them
            parts[-1] += part
        else:
            parts.append(part)
        self.kind_of = kinds
        shares = [self.deal(part) for part in parts]  # shares[k][r]: the images of part k that process r reads
        self.parts = [share[self.rank] for share in shares]
        counts = [[sum(self.grid(self.sizes[i], self.offset) for i in images) for images in share] for share in shares]
        self.total = sum(map(sum, counts))
        self.counts = [c[self.rank] for c in counts]
        self.starts = torch.tensor([0, *self.counts]).cumsum(0)[:-1].tolist()  # each part's first patch here
        self.orders = []
        for start, part_counts in zip(self.starts, counts, strict=True):
            drawn = [torch.randperm(n, generator=generator) for n in part_counts]  # every process draws all alike
            mine, steps = drawn[self.rank], max(part_counts)
            self.orders.append(start + mine.repeat(-(-steps // len(mine)))[:steps])  # as many as the largest share
        self.loaded, self.stream, self.next_part = None, None, 0

    def deal(self, part: list[int]) -> list[list[int]]:
        """The images of `part` dealt out to the processes, largest grid first to the process with the
        fewest patches so far; each keeps them in the part's order (one process: the part as it is)."""
        patches, owner = [0] * self.world, {}
        for i in sorted(part, key=lambda i: -self.grid(self.sizes[i], self.offset)):
            owner[i] = min(range(self.world), key=lambda r: (patches[r], r))
            patches[owner[i]] += self.grid(self.sizes[i], self.offset)
        return [[i for i in part if owner[i] == r] for r in range(self.world)]

    def batches(self, batch_size: int, processes: "Processes", seed: int, epoch: int) -> list[torch.Tensor]:
        """This process's patch indices of every batch of the epoch: each part's patches in their drawn
        order, in batches of its share of `batch_size`."""
        return [chunk for order in self.orders for chunk in order.split(batch_size // processes.world)]

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The patches at `index` (of one part, as `batches` gives them), reading the part first if it
        is not the one held."""
        part = bisect.bisect_right(self.starts, int(index[0])) - 1
        if self.loaded is None or self.loaded[0] != part:
            self.loaded = None  # let the part held go before the next is read
            self.loaded = (part, self.read(part))
        return self.loaded[1].take((index - self.starts[part]).to(self.device))

    def read(self, part: int) -> TrainingPatches:
        """The images of `part`, from workers that read ahead from this part on."""
        if self.stream is None or self.next_part != part:  # a new epoch, or resumed within one
            images = [i for p in self.parts[part:] for i in p]
            entries = Entries([self.entries[i] for i in images], [self.kind_of[i] for i in images], self.scale)
            ahead = {} if not self.workers else {"prefetch_factor": -(-max(map(len, self.parts)) // self.workers)}
            self.stream = iter(DataLoader(entries, batch_size=None, num_workers=self.workers,
                                          worker_init_fn=leave_ctrl_c_to_training, **ahead))  # a part ahead
        items = [next(self.stream) for _ in self.parts[part]]
        if unreadable := next((item for item in items if isinstance(item, str)), None):
            raise UserError(unreadable)
        pairs = [("", *item) for item in items]
        self.next_part = part + 1
        patches = TrainingPatches.of_pairs([pairs], self.patch_size, self.stride, self.device)
        patches.place(self.offset, None)
        if len(patches) != self.counts[part]:
            raise UserError(f"an image of {self.entries[self.parts[part][0]][0].parent} changed size while training")
        return patches

    def __len__(self) -> int:
        return self.total
