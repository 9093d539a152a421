"""Residual networks for 32x32 images: the ResidualBlock and the CIFAR ResNet family.

Two layouts share one class. ``ResNet18``/``ResNet34`` are the ImageNet depths with a 3x3 stem
and no max-pool (64-128-256-512 channels, 11.2M parameters for ResNet-18); ``ResNet20/32/56``
are He et al.'s thin CIFAR networks (16-32-64 channels) that train in minutes on a CPU.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from project.models.init import InitScheme, initialize
from project.models.input_stats import InputStatistics


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut.

    ReLUs are functional and not in-place: an in-place op on a hooked module's output breaks
    ``register_full_backward_hook``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # An empty Sequential is the identity and adds no state_dict keys.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A stem, a ModuleList of stages of ResidualBlocks, global average pooling and a classifier.

    ``input_stats`` (an :class:`InputStatistics`) keeps the per-channel mean/std of the training
    inputs in buffers, beside BatchNorm's running statistics; it adds no parameters.

    Args:
        blocks_per_stage: residual blocks in each stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        widths: output channels of each stage; stage ``i > 0`` halves the resolution.
        num_classes: number of output logits.
        in_channels: image channels.
        init: weight-initialisation scheme (see :mod:`project.models.init`).
        init_scale: std for ``init="normal"``, bound for ``init="uniform"``.
    """

    def __init__(
        self,
        blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_channels: int = 3,
        init: InitScheme = "kaiming_normal",
        init_scale: float | None = None,
    ) -> None:
        super().__init__()
        if len(blocks_per_stage) != len(widths) or not widths:
            raise ValueError(
                f"blocks_per_stage {list(blocks_per_stage)} and widths {list(widths)} must be "
                "non-empty and of the same length (one entry per stage)."
            )
        if min(blocks_per_stage) < 1 or min(widths) < 1 or num_classes < 1:
            raise ValueError("ResNet needs at least one block per stage, positive widths and num_classes >= 1.")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        # Buffers only (no parameters): the per-channel statistics of the training inputs. It runs
        # first in forward but is registered after the stem, so the state_dict still opens with
        # the stem's keys, in the order torchvision-style code expects.
        self.input_stats = InputStatistics(in_channels)
        # Stages are indexed (stage i halves the resolution), so a ModuleList holds them.
        self.stages = nn.ModuleList()
        channels = widths[0]
        for i, (n_blocks, width) in enumerate(zip(blocks_per_stage, widths)):
            stride = 1 if i == 0 else 2
            blocks = [ResidualBlock(channels, width, stride)]
            blocks += [ResidualBlock(width, width, 1) for _ in range(n_blocks - 1)]
            self.stages.append(nn.Sequential(*blocks))
            channels = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        initialize(self, init, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.input_stats(x))
        for stage in self.stages:
            x = stage(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class _NamedResNet(ResNet):
    """A ResNet whose depth and widths are fixed by the subclass (so a config names it by class)."""

    blocks_per_stage: tuple[int, ...] = ()
    widths: tuple[int, ...] = ()

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        init: InitScheme = "kaiming_normal",
        init_scale: float | None = None,
    ) -> None:
        super().__init__(self.blocks_per_stage, self.widths, num_classes, in_channels, init, init_scale)


class ResNet18(_NamedResNet):
    """ResNet-18, CIFAR layout: blocks (2, 2, 2, 2), widths 64-128-256-512."""

    blocks_per_stage, widths = (2, 2, 2, 2), (64, 128, 256, 512)


class ResNet34(_NamedResNet):
    """ResNet-34, CIFAR layout: blocks (3, 4, 6, 3), widths 64-128-256-512."""

    blocks_per_stage, widths = (3, 4, 6, 3), (64, 128, 256, 512)


class ResNet20(_NamedResNet):
    """He et al.'s CIFAR ResNet-20: 3 stages of 3 blocks, widths 16-32-64 (0.27M parameters)."""

    blocks_per_stage, widths = (3, 3, 3), (16, 32, 64)


class ResNet32(_NamedResNet):
    """He et al.'s CIFAR ResNet-32: 3 stages of 5 blocks, widths 16-32-64."""

    blocks_per_stage, widths = (5, 5, 5), (16, 32, 64)


class ResNet56(_NamedResNet):
    """He et al.'s CIFAR ResNet-56: 3 stages of 9 blocks, widths 16-32-64."""

    blocks_per_stage, widths = (9, 9, 9), (16, 32, 64)
