"""The device-resident data pipeline: same augmentation family as the DataLoader path, exact
epochs, disjoint DDP shards, and real Lightning runs (single process and 2-process DDP on CPU)."""

import functools
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from project.classifier import ImageClassifier
from project.data import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule
from project.data.device_loader import DeviceLoader, EpochSampler
from project.models import LeNet
from tests.conftest import QUIET, make_npz, run_cli, run_dirs

PIPELINES = ("dataloader", "device")


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> the reference normalisation, written out: (x / 255 - mean) / std."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def all_crops_and_flips(image: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Every augmentation of one uint8 image: shifts -4..4 (zero fill) x 2 flips, (9, 9, 2, C, H, W)."""
    padded = F.pad(image, (padding,) * 4)
    _, h, w = image.shape
    crops = torch.stack(
        [
            torch.stack([padded[:, top : top + h, left : left + w] for left in range(2 * padding + 1)])
            for top in range(2 * padding + 1)
        ]
    )
    return torch.stack([crops, crops.flip(-1)], dim=2)


def assert_is_augmentation_of(output: torch.Tensor, original: torch.Tensor) -> None:
    candidates = normalise(all_crops_and_flips(original).flatten(0, 2))
    distance = (candidates - output).abs().flatten(1).amax(1).min()
    assert distance < 1e-4, f"output is no crop/flip of its image (closest differs by {distance})"


def coordinate_images(n: int) -> np.ndarray:
    """NHWC images whose pixels name their own position: channel 0 = 1 + 7 x, channel 1 = 1 + 7 y.

    A shifted, flipped crop of one says its shift and flip at a glance, and padding reads 0.
    """
    ys, xs = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    image = np.stack([1 + 7 * xs, 1 + 7 * ys, np.full_like(xs, 128)], axis=-1).astype(np.uint8)
    return np.repeat(image[None], n, axis=0)


def decode(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, flipped) of crops of coordinate images given in [0, 1] units (normalize=False)."""
    pixels = torch.round(batch * 255).long()
    centre_x, centre_y = pixels[:, 0, 16, 16], pixels[:, 1, 16, 16]
    flipped = pixels[:, 0, 16, 17] < centre_x
    # The output's column 16 shows source column left + 16, or left + 15 when flipped.
    dx = (centre_x - 1) // 7 - 16 + flipped.long()
    dy = (centre_y - 1) // 7 - 16
    return dx, dy, flipped


def datamodule(npz: Path, pipeline: str, **kwargs) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(npz=npz, pipeline=pipeline, num_workers=0, **{"val_size": 16, **kwargs})
    dm.setup("fit")
    return dm


def batches(loader, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(loader, DeviceLoader):
        loader.set_epoch(epoch)
    return list(loader)


def test_pipeline_choice(tiny_npz):
    dm = datamodule(tiny_npz, "device")
    assert isinstance(dm.train_dataloader(), DeviceLoader)
    assert isinstance(dm.val_dataloader(), DeviceLoader)
    assert isinstance(dm.test_dataloader(), DeviceLoader)
    assert isinstance(datamodule(tiny_npz, "dataloader").train_dataloader(), torch.utils.data.DataLoader)
    # auto means the device pipeline only on CUDA; without a trainer (or on CPU) the DataLoader.
    assert datamodule(tiny_npz, "auto").resolved_pipeline() == "dataloader"
    with pytest.raises(ValueError, match="data.pipeline"):
        CIFAR10DataModule(npz=tiny_npz, pipeline="gpu")


@pytest.mark.parametrize("normalize", [True, False])
def test_without_augmentation_both_pipelines_give_the_same_batches(tiny_npz, normalize):
    loaders = [datamodule(tiny_npz, p, normalize=normalize, eval_batch_size=10) for p in PIPELINES]
    for stage in ("val_dataloader", "test_dataloader"):
        (ref, dev) = (batches(getattr(dm, stage)()) for dm in loaders)
        assert [len(x) for x, _ in ref] == [len(x) for x, _ in dev]
        for (x_ref, y_ref), (x_dev, y_dev) in zip(ref, dev):
            assert x_dev.dtype == x_ref.dtype == torch.float32
            torch.testing.assert_close(x_dev, x_ref, atol=1e-5, rtol=0)
            assert torch.equal(y_dev, y_ref)


def test_normalised_statistics_are_identical(subset_npz):
    """On real images both pipelines normalise to the same per-channel mean and std."""
    stats = []
    for pipeline in PIPELINES:
        dm = datamodule(subset_npz, pipeline, val_size=500, augment=False, eval_batch_size=128)
        images = torch.cat([x for x, _ in batches(dm.val_dataloader())])
        stats.append(torch.stack([images.mean(dim=(0, 2, 3)), images.std(dim=(0, 2, 3))]))
    torch.testing.assert_close(stats[0], stats[1], atol=1e-5, rtol=0)
    # CIFAR-10's own statistics: real images come out roughly standardised.
    assert stats[1][0].abs().max() < 0.2 and (stats[1][1] - 1).abs().max() < 0.2


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_training_images_are_shifted_flipped_crops_with_normalised_zero_padding(tmp_path, pipeline):
    npz = make_npz(tmp_path / "d.npz", n_train=40, n_test=4)
    dm = datamodule(npz, pipeline, val_size=8, batch_size=16)
    originals = dm.train_split.images
    if pipeline == "device":
        loader = dm.train_dataloader()
        loader.set_epoch(3)
        order = loader.sampler.indices()
        outputs = torch.cat([x for x, _ in loader])
        labels = torch.cat([y for _, y in loader])
        assert torch.equal(labels, dm.train_split.labels[order])
    else:
        dataset = dm.train_dataloader().dataset
        order = torch.arange(len(dataset))
        outputs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert len(outputs) == len(originals)
    for index, output in zip(order.tolist(), outputs):
        assert_is_augmentation_of(output, originals[index])


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_augmentation_statistics(tmp_path, pipeline):
    """Shifts uniform over -4..4 in each direction and flips half the time, in both pipelines."""
    n = 512
    npz = make_npz(tmp_path / "coords.npz", n_train=n, n_test=4, x_train=coordinate_images(n))
    dm = datamodule(npz, pipeline, val_size=0, normalize=False, batch_size=128)
    loader = dm.train_dataloader()
    outputs = torch.cat([x for epoch in range(4) for x, _ in batches(loader, epoch)])
    dx, dy, flipped = decode(outputs)
    assert len(dx) == 4 * n
    for shift in (dx, dy):
        assert shift.min() == -4 and shift.max() == 4
        frequencies = torch.bincount(shift + 4, minlength=9).float() / len(shift)
        assert ((frequencies - 1 / 9).abs() < 0.04).all(), frequencies
    assert 0.44 < flipped.float().mean() < 0.56
    # Shifts in x and y are independent draws, not one shared offset.
    assert (dx != dy).float().mean() > 0.7


def test_every_image_exactly_once_per_epoch_in_a_new_order(tmp_path):
    npz = make_npz(tmp_path / "d.npz", n_train=100, n_test=4)
    dm = datamodule(npz, "device", val_size=0, augment=False, batch_size=32)
    loader = dm.train_dataloader()
    assert len(loader) == 4  # 32 + 32 + 32 + 4: the last, smaller batch is kept, as in the DataLoader path
    originals = normalise(dm.train_split.images)
    orders = []
    for epoch in (0, 1, 1):
        images = torch.cat([x for x, _ in batches(loader, epoch)])
        # Find each yielded image among the originals: every one exactly once.
        match = (images[:, None] - originals[None]).abs().flatten(2).amax(2) < 1e-5
        assert (match.sum(1) == 1).all() and (match.sum(0) == 1).all()
        orders.append(match.float().argmax(1))
    assert not torch.equal(orders[0], orders[1])  # reshuffled every epoch
    assert torch.equal(orders[1], orders[2])  # and reproducibly so


@pytest.mark.parametrize("size,world", [(103, 4), (100, 4), (7, 3), (10, 1)])
def test_training_shards_are_disjoint_and_equal(size, world):
    for epoch in (0, 5):
        shards = []
        for rank in range(world):
            sampler = EpochSampler(size, shuffle=True, seed=42, rank=rank, world_size=world)
            sampler.set_epoch(epoch)
            shards.append(sampler.indices())
        assert {len(s) for s in shards} == {size // world}
        together = torch.cat(shards)
        assert len(together.unique()) == len(together) == world * (size // world)
        assert together.min() >= 0 and together.max() < size
    # Every rank computes the same permutation, so a shard differs between epochs but not ranks' agreement.
    first = EpochSampler(size, seed=42, world_size=world)
    second = EpochSampler(size, seed=42, world_size=world)
    second.set_epoch(1)
    assert size < 10 or not torch.equal(first.indices(), second.indices())


def test_evaluation_shards_cover_every_image():
    shards = [EpochSampler(103, shuffle=False, rank=r, world_size=4, even="pad").indices() for r in range(4)]
    assert {len(s) for s in shards} == {26}
    assert set(torch.cat(shards).tolist()) == set(range(103))
    with pytest.raises(ValueError, match="non-empty shards"):
        EpochSampler(2, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(10, rank=2, world_size=2)


def test_loader_lengths_match_across_ranks_and_drop_last():
    images = torch.zeros(103, 3, 8, 8, dtype=torch.uint8)
    labels = torch.zeros(103, dtype=torch.long)
    lengths = {len(DeviceLoader(images, labels, 10, shuffle=True, rank=r, world_size=4)) for r in range(4)}
    assert lengths == {3}  # 25 images per rank: 10 + 10 + 5
    loader = DeviceLoader(images, labels, 10, drop_last=True)
    assert len(loader) == 10 and [len(x) for x, _ in loader] == [10] * 10
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(images.float(), labels, 10)


def test_augmentation_is_seeded_by_epoch():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.zeros(64, dtype=torch.long)

    def first_batch(epoch: int) -> torch.Tensor:
        loader = DeviceLoader(images, labels, 64, augment=True, seed=1)
        loader.set_epoch(epoch)
        return next(iter(loader))[0]

    assert torch.equal(first_batch(2), first_batch(2))
    assert not torch.equal(first_batch(2), first_batch(3))


class _Probe(L.Callback):
    """Records what Lightning hands the training step and which epochs the sampler was set to."""

    def __init__(self) -> None:
        self.epochs, self.devices, self.dtypes = [], set(), set()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs.append(trainer.train_dataloader.sampler.epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.devices.add(batch[0].device.type)
        self.dtypes.add(batch[0].dtype)


def test_lightning_trains_from_the_device_pipeline_and_sets_its_epoch(tiny_npz, tmp_path):
    dm = CIFAR10DataModule(npz=tiny_npz, val_size=16, batch_size=8, pipeline="device")
    model = ImageClassifier(
        LeNet(),
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        scheduler=functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.01),
    )
    probe = _Probe()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[probe],
    )
    trainer.fit(model, datamodule=dm)
    assert isinstance(trainer.train_dataloader, DeviceLoader)
    assert probe.epochs == [0, 1, 2]
    assert probe.devices == {"cpu"} and probe.dtypes == {torch.float32}
    assert trainer.global_step == 3 * 6  # 48 training images in batches of 8
    assert trainer.estimated_stepping_batches == 18
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == 18, (
        "OneCycleLR planned from the device loader's length"
    )
    assert "val/acc" in trainer.callback_metrics
    predictions = trainer.predict(model, datamodule=dm)
    assert sum(len(p["preds"]) for p in predictions) == 32


def test_ddp_two_processes_train_on_disjoint_halves(tiny_npz, tmp_path):
    """Real 2-process DDP (gloo, CPU): each rank takes 24 of the 48 training images per epoch."""
    result = run_cli(
        [
            "fit",
            "-c",
            "experiments/lenet.yaml",
            f"--data.npz={tiny_npz}",
            "--data.val_size=16",
            "--data.batch_size=8",
            "--data.pipeline=device",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
            "--trainer.max_epochs=2",
            "--test_after_fit=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--name=ddp",
            *QUIET,
        ],
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = run_dirs(tmp_path, "ddp")
    checkpoints = sorted((run / "checkpoints").glob("*.ckpt"))
    assert checkpoints
    steps = {torch.load(c, map_location="cpu", weights_only=False)["global_step"] for c in checkpoints}
    # 24 images per rank in batches of 8 is 3 steps per epoch; without sharding it would be 6.
    assert max(steps) == 2 * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_pipeline_on_cuda(tiny_npz):
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(64)
    loader = DeviceLoader(
        images, labels, 16, shuffle=True, augment=True, mean=CIFAR10_MEAN, std=CIFAR10_STD, device="cuda"
    )
    order = loader.sampler.indices()
    outputs = torch.cat([x for x, _ in loader])
    assert outputs.is_cuda and torch.cat([y for _, y in loader]).is_cuda
    for index, output in zip(order.tolist(), outputs.cpu()):
        assert_is_augmentation_of(output, images[index])
