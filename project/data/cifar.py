"""The LightningDataModule shared by the datasets in the CIFAR python format (CIFAR-10, CIFAR-100):
official archive or offline npz in, seeded splits and loaders out."""

import os
import signal
from pathlib import Path
from typing import ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from project.data import cifar_files as files
from project.data.cifar_files import CIFARFormat, DatasetError, Split
from project.data.device_loader import DeviceLoader
from project.errors import UserError

Pipeline = Literal["auto", "dataloader", "device"]


def leave_stops_to_the_parent(worker_id: int) -> None:
    """A DataLoader worker ignores the signals that ask a run to stop. A scheduler sends them to every process
    of a job (``scancel``, pre-emption, the time-limit warning), and PyTorch's workers die of a SIGTERM their
    parent did not send, which ends the fit before it can save; their parent saves and shuts them down."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


class TensorImageDataset(Dataset):
    """uint8 images held in one tensor, transformed one sample at a time (in loader workers)."""

    def __init__(self, split: Split, transform: v2.Transform) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.split.images[index]), int(self.split.labels[index])


def image_transform(
    augment: bool, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
) -> v2.Transform:
    """uint8 CHW tensor -> float tensor: optional crop+flip, scale to [0, 1], normalise when ``mean`` and ``std`` are given."""
    steps: list[v2.Transform] = []
    if augment:
        steps += [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if mean is not None and std is not None:
        steps.append(v2.Normalize(mean, std))
    return v2.Compose(steps)


class CIFARDataModule(L.LightningDataModule):
    """A dataset in the CIFAR python format, from its official archive (downloaded when missing) or
    from a Keras-layout npz file. A subclass sets ``format``, the dataset's description (see
    CIFAR10DataModule, CIFAR100DataModule); the arguments are the same for every such dataset.

    It declares what the rest of the template reads from a data module: ``num_classes`` and
    ``image_shape`` (linked into the model by the CLI), ``classes`` (names, for plots) and ``mean``
    and ``std`` (the normalisation applied, ``None`` without it; the plots undo it).

    Args:
        data_dir: folder holding the archive (``format.archive_name``) or its extracted folder
            (``format.folder_name``); the archive is downloaded there when neither is present and
            ``download`` is true. ``None``: ``format.default_dir`` (``data/cifar10``, ``data/cifar100``).
        npz: a Keras-layout npz (x_train, y_train, x_test, y_test; NHWC uint8) used instead of
            ``data_dir``, e.g. ``../shared/data/cifar10_subset.npz`` to run offline on real images.
        download: fetch the archive when it is missing (on local rank 0 of each node).
        url: where to download from (``None``: the official archive); ``md5``: the archive's checksum,
            checked after download and before extraction (``None``: the official archive's).
        val_size: training images held out for validation: a count (``5000``; 0 disables validation)
            or a fraction of the training set (``0.1``). A split that leaves fewer training than
            validation images warns.
        split_seed: seed of the train/validation split, independent of the training seed.
        augment: random crop with 4-pixel padding and horizontal flip on training images.
        normalize: subtract the dataset's channel mean (``format.mean``) and divide by its std.
        batch_size: training batch size per process; ``eval_batch_size``: for val/test/predict.
        num_workers, pin_memory, persistent_workers: passed to every DataLoader.
        pipeline: ``dataloader`` (torch DataLoader, torchvision transforms per image, in
            ``num_workers`` processes), ``device`` (the whole uint8 split on the training device,
            shuffled, sharded across processes and augmented there in a few batched tensor
            operations; see :mod:`project.data.device_loader`) or ``auto`` (``device`` on CUDA,
            ``dataloader`` otherwise). Both apply the same augmentation and normalisation.
    """

    format: ClassVar[CIFARFormat]

    def __init__(
        self,
        data_dir: str | Path | None = None,
        npz: str | Path | None = None,
        download: bool = True,
        url: str | None = None,
        md5: str | None = None,
        val_size: int | float = 5000,
        split_seed: int = 0,
        augment: bool = True,
        normalize: bool = True,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        pipeline: Pipeline = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise UserError(f"data.{name} must be at least 1, got {value}.")
        if isinstance(val_size, float) and not 0 < val_size < 1:
            raise UserError(
                f"data.val_size must be a count of images (a whole number >= 0) or a fraction between 0 and 1, got {val_size}."
            )
        if val_size < 0:
            raise UserError(f"data.val_size must be >= 0, got {val_size}.")
        if url is not None and not url.lower().startswith(("http://", "https://")):
            raise UserError(f"data.url must be an http:// or https:// address of the archive, got {url!r}.")
        if num_workers < 0:
            raise UserError(f"data.num_workers must be >= 0, got {num_workers}.")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir or self.format.default_dir).expanduser()
        self.npz = Path(npz).expanduser() if npz is not None else None
        self.download, self.url, self.md5 = download, url or self.format.url, md5 or self.format.md5
        self.val_size, self.split_seed = val_size, split_seed
        self.augment, self.normalize = augment, normalize
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        if pipeline not in ("auto", "dataloader", "device"):
            raise UserError(f"data.pipeline must be auto, dataloader or device, got {pipeline!r}.")
        self.pipeline = pipeline
        self.train_split: Split | None = None
        self.val_split: Split | None = None
        self.test_split: Split | None = None
        self._train_loader: DeviceLoader | None = None
        self._train_loader_state: dict | None = None

    @property
    def num_classes(self) -> int:
        return self.format.num_classes

    @property
    def classes(self) -> tuple[str, ...]:
        return self.format.classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of every image the model is given."""
        return files.IMAGE_SHAPE

    @property
    def mean(self) -> tuple[float, float, float] | None:
        """The per-channel mean subtracted from the images in [0, 1] units; ``None`` when ``normalize`` is off."""
        return self.format.mean if self.normalize else None

    @property
    def std(self) -> tuple[float, float, float] | None:
        """The per-channel std the images are divided by; ``None`` when ``normalize`` is off."""
        return self.format.std if self.normalize else None

    def prepare_data(self) -> None:
        """Download and extract once per node (Lightning calls this on local rank 0 only)."""
        if self.npz is not None:
            return
        fmt = self.format
        found = files.locate(self.data_dir, fmt)
        if found is None:
            if not self.download:
                raise DatasetError(
                    f"{fmt.name} is not in {self.data_dir} (no {fmt.archive_name} or {fmt.folder_name}/) and "
                    "download is off; set --data.download=true, place the archive there, or use --data.npz."
                )
            found = files.download(self.data_dir, fmt, self.url, self.md5)
        if found.name == fmt.archive_name:
            files.extract(found, fmt, self.md5)

    def load(self) -> tuple[Split, Split]:
        """The full official (or npz) train and test splits, as uint8 tensors."""
        if self.npz is not None:
            return files.read_npz(self.npz, self.format)
        folder = self.data_dir / self.format.folder_name
        if not folder.is_dir():
            raise DatasetError(f"{folder} does not exist; run prepare_data() first or check --data.data_dir.")
        return files.read_official(folder, self.format)

    def setup(self, stage: str | None = None) -> None:
        if self.train_split is not None:
            return
        train, self.test_split = self.load()
        val_count = self.validation_count(len(train))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = order[:val_count], order[val_count:]
        self.train_split = Split(train.images[train_idx], train.labels[train_idx])
        self.val_split = Split(train.images[val_idx], train.labels[val_idx]) if val_count else None

    def validation_count(self, available: int) -> int:
        """How many of the ``available`` training images ``val_size`` holds out (a count or a fraction)."""
        count = round(self.val_size * available) if isinstance(self.val_size, float) else self.val_size
        if isinstance(self.val_size, float) and count == 0:
            raise UserError(
                f"data.val_size={self.val_size} of {available} training images is no image; give a larger fraction or 0."
            )
        if count >= available:
            raise UserError(
                f"data.val_size={self.val_size} leaves no training images (the training set has {available}); "
                "choose a smaller val_size."
            )
        if available - count < count:
            rank_zero_warn(
                f"data.val_size={self.val_size} holds out {count} of {available} training images, so the model "
                f"trains on only {available - count}; give a smaller val_size (e.g. 0.1) to train on more."
            )
        return count

    @property
    def device(self) -> torch.device:
        """The trainer's root device (where the device pipeline keeps the data); CPU without a trainer."""
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def resolved_pipeline(self) -> str:
        """``dataloader`` or ``device``: what ``pipeline`` means on this trainer's device."""
        if self.pipeline != "auto":
            return self.pipeline
        return "device" if self.device.type == "cuda" else "dataloader"

    def _device_loader(self, split: Split, train: bool) -> DeviceLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        return DeviceLoader(
            split.images,
            split.labels,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            augment=self.augment and train,
            mean=self.mean,
            std=self.std,
            # The seed Lightning gives a DistributedSampler: seed_everything's, the same on every rank.
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
            rank=rank,
            world_size=world,
            # Training shards are disjoint; evaluation shards repeat a few images so none is left out.
            even="truncate" if train else "pad",
            device=self.device,
        )

    def _loader(self, split: Split, train: bool) -> DataLoader | DeviceLoader:
        if self.resolved_pipeline() == "device":
            return self._device_loader(split, train)
        return DataLoader(
            TensorImageDataset(split, image_transform(self.augment and train, self.mean, self.std)),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            worker_init_fn=leave_stops_to_the_parent if self.num_workers else None,
        )

    def train_dataloader(self) -> DataLoader | DeviceLoader:
        loader = self._loader(self.train_split, train=True)
        if isinstance(loader, DeviceLoader):
            if self._train_loader_state is not None:
                loader.load_state_dict(self._train_loader_state)
                self._train_loader_state = None
            self._train_loader = loader
        return loader

    def state_dict(self) -> dict:
        """Where training stands within the epoch (device pipeline), saved in every checkpoint.

        Lightning would restore it through the loader itself, but only when the loader is created
        after the checkpoint is loaded; a cosine or one-cycle schedule asks for it earlier (to count
        the steps), so the data module carries the state across instead.
        """
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._train_loader_state = state_dict.get("train_loader")
        if self._train_loader is not None and self._train_loader_state is not None:
            self._train_loader.load_state_dict(self._train_loader_state)

    def val_dataloader(self) -> DataLoader | list:
        # An empty list tells Lightning there is no validation (val_size=0).
        return self._loader(self.val_split, train=False) if self.val_split is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, train=False)
