"""Residual networks for 32x32 images: the ResidualBlock, InputStatistics and the CIFAR ResNet family.

Two layouts share one class. ``ResNet18``/``ResNet34`` are the ImageNet depths with a 3x3 stem
and no max-pool (64-128-256-512 channels, 11.2M parameters for ResNet-18); ``ResNet20/32/56``
are He et al.'s thin CIFAR networks (16-32-64 channels) that train in minutes on a CPU.

The file needs torch and one sibling, ``init.py``: copy both to use it elsewhere.

What a module keeps, and where it goes (``tests/test_models.py`` checks each line):

- ``nn.Parameter`` (``fc.weight``, ``logit_scale["scale"]``): in ``parameters()`` (so the
  optimiser trains it) and in ``state_dict()``; ``.to(device/dtype)`` moves it.
- persistent buffer (``bn1.running_mean``, ``input_stats.count``): not in ``parameters()``, in
  ``state_dict()``; ``.to()`` moves it (an integer one keeps its dtype under ``.to(float64)``).
- non-persistent buffer (``input_stats.std``): in neither; ``.to()`` still moves it.
- plain tensor attribute (``self.t = torch.ones(3)``, deliberately none here): in neither, and
  ``.to()`` leaves it where it was: the bug behind "Expected all tensors to be on the same device".

Containers register what they hold the same way: ``nn.ModuleList`` (``ResNet.stages``),
``nn.ModuleDict`` (``ResNet.pool``, by name) and ``nn.ParameterDict`` (``ResNet.logit_scale``).
A plain ``list`` or ``dict`` of modules or parameters would hide them from ``parameters()``,
``state_dict()``, ``.to()`` and ``.train()``/``.eval()``.
"""

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from project.models.init import InitScheme, initialize

#: Global pooling of the last stage's features, by name; ``avgmax`` concatenates both (2x the features).
Pooling = Literal["avg", "max", "avgmax"]
_POOLS = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}


class InputStatistics(nn.Module):
    """The identity on the forward pass; in training mode it also accumulates input statistics.

    A network's buffers hold what it learns without optimising (BatchNorm's running statistics
    are the classic case). This module adds one a user can read directly: did the inputs reach
    the network normalised (mean near 0, std near 1 per channel), and how many images has it seen?

    Buffers (``state_dict`` holds the persistent ones; all of them follow ``.to(device)``):

    - ``count`` (persistent, int64): images seen in training mode.
    - ``mean``, ``var`` (persistent, per channel): mean and population variance over every pixel
      of those images, merged batch by batch (Chan et al.'s parallel update; exact for images of
      one size).
    - ``std`` (non-persistent): ``sqrt(var)``, a cache refreshed after every update and every
      ``load_state_dict``. Derived state is not saved, so a checkpoint can never hold a ``std``
      that disagrees with its ``var``.

    Under DDP, buffers are broadcast from rank 0 before every training forward pass, so the
    saved statistics are rank 0's: the images of its shard, not of all ranks.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"InputStatistics needs channels >= 1, got {channels}.")
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.zeros(channels))
        self.register_buffer("std", torch.zeros(channels), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update(x)
        return x

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the statistics of the batch ``x`` (N, C, ...) into the buffers."""
        if x.ndim < 2 or x.shape[1] != self.mean.numel():
            raise ValueError(f"InputStatistics expects (N, {self.mean.numel()}, ...) inputs, got {tuple(x.shape)}.")
        values = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1)
        batch_var, batch_mean = torch.var_mean(values, dim=1, correction=0)
        n_old, n_new = self.count.float(), float(x.shape[0])
        total = n_old + n_new
        delta = batch_mean - self.mean
        self.mean.add_(delta * (n_new / total))
        self.var.copy_((self.var * n_old + batch_var * n_new + delta.square() * (n_old * n_new / total)) / total)
        self.count.add_(x.shape[0])
        self.refresh_cache()

    @torch.no_grad()
    def refresh_cache(self) -> None:
        self.std.copy_(self.var.clamp_min(0).sqrt())

    def extra_repr(self) -> str:
        return f"channels={self.mean.numel()}"


def _refresh_after_load(module: InputStatistics, incompatible_keys) -> None:
    # A module-level function, not a lambda, so the module stays picklable (ddp_spawn pickles it).
    module.refresh_cache()


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
    """A stem, a ModuleList of stages of ResidualBlocks, global pooling and a linear classifier.

    ``input_stats`` (an :class:`InputStatistics`) keeps the per-channel mean/std of the training
    inputs in buffers, beside BatchNorm's running statistics; it adds no parameters.

    The head: ``pool`` is an ``nn.ModuleDict`` of the pooling layers named by ``pool`` (``avg``:
    ``{"avg": AdaptiveAvgPool2d}``; ``avgmax``: both, their features concatenated, as fastai's
    concat pooling), ``fc`` the linear layer, and with ``logit_scale`` an ``nn.ParameterDict``
    ``{"scale": ones(num_classes), "bias": zeros(num_classes)}`` that learns a scale and a shift
    per class on top of the logits (Guo et al.'s vector scaling). The defaults (``avg``, no
    ``logit_scale``) give the state_dict keys of the classic ResNet, ending in ``fc.weight``,
    ``fc.bias``; ``logit_scale`` adds ``logit_scale.scale`` and ``logit_scale.bias``.

    Args:
        blocks_per_stage: residual blocks in each stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        widths: output channels of each stage; stage ``i > 0`` halves the resolution.
        num_classes: number of output logits.
        in_channels: image channels.
        init: weight-initialisation scheme (see :mod:`project.models.init`).
        init_scale: std for ``init="normal"``, bound for ``init="uniform"``.
        pool: global pooling before ``fc``: ``avg``, ``max`` or ``avgmax`` (both, concatenated).
        logit_scale: learn a per-class scale and bias of the logits (``logit_scale.scale``, ``.bias``).
    """

    def __init__(
        self,
        blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_channels: int = 3,
        init: InitScheme = "kaiming_normal",
        init_scale: float | None = None,
        pool: Pooling = "avg",
        logit_scale: bool = False,
    ) -> None:
        super().__init__()
        if len(blocks_per_stage) != len(widths) or not widths:
            raise ValueError(
                f"blocks_per_stage {list(blocks_per_stage)} and widths {list(widths)} must be "
                "non-empty and of the same length (one entry per stage)."
            )
        if min(blocks_per_stage) < 1 or min(widths) < 1 or num_classes < 1:
            raise ValueError("ResNet needs at least one block per stage, positive widths and num_classes >= 1.")
        if pool not in ("avg", "max", "avgmax"):
            raise ValueError(f"Unknown ResNet pool {pool!r}; choose avg, max or avgmax.")
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
        # Registered by name ("pool.avg", "pool.max"): they show in named_modules() and follow
        # .train()/.eval(); parameter-free, they add no state_dict keys.
        names = ("avg", "max") if pool == "avgmax" else (pool,)
        self.pool = nn.ModuleDict({name: _POOLS[name](1) for name in names})
        self.fc = nn.Linear(channels * len(names), num_classes)
        # Registered as parameters "logit_scale.scale" and "logit_scale.bias"; None adds nothing.
        self.logit_scale = None
        if logit_scale:
            self.logit_scale = nn.ParameterDict({"scale": torch.ones(num_classes), "bias": torch.zeros(num_classes)})
        initialize(self, init, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.input_stats(x))
        for stage in self.stages:
            x = stage(x)
        pooled = [torch.flatten(pool(x), 1) for pool in self.pool.values()]
        logits = self.fc(pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1))
        if self.logit_scale is not None:
            logits = logits * self.logit_scale["scale"] + self.logit_scale["bias"]
        return logits


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
        pool: Pooling = "avg",
        logit_scale: bool = False,
    ) -> None:
        super().__init__(
            self.blocks_per_stage, self.widths, num_classes, in_channels, init, init_scale, pool, logit_scale
        )


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
