"""Batches from a dataset that lives on the training device: shuffled, sharded and augmented there.

The whole uint8 split is copied to the device once (CIFAR-10's 50,000 training images are 150 MB).
Each epoch a seeded permutation orders it, each process takes its own equal, disjoint shard, and
every batch is made by one gather (which picks the images, crops them and flips them at once)
and one fused scale-and-shift for normalisation. No worker processes, no per-sample Python:
the GPU, not the data loader, limits training (the idea of Keller Jordan's airbench).

The augmentation is the one the DataLoader path applies with torchvision (``RandomCrop(32,
padding=4)`` with zero fill, then ``RandomHorizontalFlip()``): a shift of -4..4 pixels in each
direction, drawn uniformly, with black pixels shifted in, and a flip with probability 1/2.
"""

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class EpochSampler:
    """The indices one process visits in one epoch, like ``DistributedSampler`` but as one tensor.

    Args:
        size: number of items in the dataset.
        shuffle: a new permutation every epoch, seeded by ``(seed, epoch)`` only, so every process
            computes the same one and the shards do not overlap.
        seed: the shuffle seed (the same on every process).
        rank, world_size: this process's shard: ``order[rank::world_size]``.
        even: how shards are made equal when ``size`` is not divisible by ``world_size``:
            ``truncate`` drops the last ``size % world_size`` items of the permutation (training:
            shards are disjoint and no item is seen twice), ``pad`` repeats the first few items
            (evaluation: every item is seen at least once, as with ``DistributedSampler``).

    Lightning calls :meth:`set_epoch` at the start of every epoch, because it finds this object
    as the loader's ``sampler`` (it does the same for a DataLoader's DistributedSampler).
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        even: str = "truncate",
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size}).")
        if even not in ("truncate", "pad"):
            raise ValueError(f"even must be 'truncate' or 'pad', got {even!r}.")
        if even == "truncate" and size < world_size:
            raise ValueError(
                f"{size} items cannot be split into {world_size} non-empty shards; use fewer processes or more data."
            )
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.even = rank, world_size, even
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.even == "truncate":
            return self.size // self.world_size
        return -(-self.size // self.world_size)

    def indices(self) -> torch.Tensor:
        """This process's indices for the current epoch (int64, on the CPU)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        total = len(self) * self.world_size
        if total < self.size:
            order = order[:total]
        elif total > self.size:
            order = torch.cat([order, order[: total - self.size]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())


class DeviceLoader:
    """An iterable of ``(images, labels)`` batches made on ``device`` from uint8 images held there.

    Lightning accepts it wherever a DataLoader goes; batches are already on the device, so moving
    them is a no-op.

    Args:
        images: uint8 tensor (N, C, H, W); ``labels``: integer tensor (N,).
        batch_size: images per batch (per process).
        shuffle, seed, rank, world_size, even: see :class:`EpochSampler`.
        augment: random crop (shift by up to ``padding`` pixels, zero fill) and horizontal flip.
        padding: the largest shift in pixels; ``flip``: whether to flip half the images.
        mean, std: per-channel statistics in [0, 1] units; images become ``(x / 255 - mean) / std``
            (just ``x / 255`` when not given).
        drop_last: drop the last batch when it is smaller than ``batch_size``.
        device: where the data is kept and batches are made; default: where ``images`` are.
        dtype: floating dtype of the images it yields.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        padding: int = 4,
        flip: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        even: str = "truncate",
        drop_last: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}.")
        if len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images; give one label per image.")
        if batch_size < 1 or padding < 0:
            raise ValueError(f"batch_size must be >= 1 and padding >= 0, got {batch_size} and {padding}.")
        self.device = torch.device(device) if device is not None else images.device
        self.batch_size, self.drop_last, self.dtype = batch_size, drop_last, dtype
        self.augment, self.padding, self.flip = augment, padding if augment else 0, flip and augment
        self.seed = seed
        self.sampler = EpochSampler(len(images), shuffle, seed, rank, world_size, even)
        # Lightning's _is_dataloader_shuffled reads batch_sampler whenever a sampler is present.
        self.batch_sampler = None
        self.labels = labels.to(self.device, torch.int64)
        p = self.padding
        # Padded once, so a batch is one gather: the crop is an offset into the padded image.
        self.images = torch.nn.functional.pad(images.to(self.device), (p, p, p, p)) if p else images.to(self.device)
        self.height, self.width = images.shape[-2:]
        channels = images.shape[1]
        mean_t = torch.tensor(mean if mean is not None else [0.0] * channels, dtype=torch.float32)
        std_t = torch.tensor(std if std is not None else [1.0] * channels, dtype=torch.float32)
        if mean_t.numel() != channels or std_t.numel() != channels or (std_t <= 0).any():
            raise ValueError(f"mean and std need {channels} entries each and std > 0, got {mean} and {std}.")
        # (x / 255 - mean) / std as one multiply-add.
        self.scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1).to(self.device)
        self.shift = (-mean_t / std_t).view(1, -1, 1, 1).to(self.device)
        self._rows = torch.arange(self.height, device=self.device)
        self._cols = torch.arange(self.width, device=self.device)
        self._channels = torch.arange(channels, device=self.device)
        self._batches_done = 0  # batches handed out by the current pass
        self._resume: dict[str, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        """Where the current pass stands. Lightning stores it in every checkpoint (and calls
        :meth:`load_state_dict` on resume), so a fit resumed mid-epoch gets exactly the batches
        the interrupted one had not reached: same order, same augmentation."""
        return {"epoch": self.sampler.epoch, "batches": self._batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _generator(self) -> torch.Generator:
        # Augmentation differs per epoch and per process, and is reproducible given both.
        seed = int(np.random.SeedSequence([self.seed, self.sampler.epoch, self.sampler.rank]).generate_state(1)[0])
        return torch.Generator(device=self.device).manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume is not None and resume["epoch"] == self.sampler.epoch else 0
        order = self.sampler.indices().to(self.device, non_blocking=True)
        generator = self._generator() if self.augment else None
        self._batches_done = 0
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            self._batches_done += 1
            if self._batches_done <= skip:
                if generator is not None:
                    self.make_batch(index, generator)  # draw its augmentation, so later batches get theirs
                continue
            yield self.make_batch(index, generator), self.labels[index]

    def make_batch(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``index`` (on the device), augmented when enabled, as normalised ``dtype``."""
        if self.augment:
            n, p = len(index), self.padding
            offsets = torch.randint(0, 2 * p + 1, (2, n, 1), device=self.device, generator=generator)
            rows = offsets[0] + self._rows  # (n, H): the crop's rows in the padded image
            cols = offsets[1] + self._cols  # (n, W)
            if self.flip:
                flipped = torch.rand(n, 1, device=self.device, generator=generator) < 0.5
                cols = torch.where(flipped, cols.flip(1), cols)
            images = self.images[
                index.view(n, 1, 1, 1), self._channels.view(1, -1, 1, 1), rows.view(n, 1, -1, 1), cols.view(n, 1, 1, -1)
            ]
        else:
            images = self.images[index]
        return torch.addcmul(self.shift, images.to(self.dtype), self.scale).to(self.dtype)
