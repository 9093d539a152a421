"""ActivationStatistics: forward hooks that log each chosen layer's activation mean, std and dead units."""

import math
from functools import partial

import lightning as L
import torch
from torch import nn

from project.callbacks.layers import HookCallback, log_metrics, select_layers
from project.errors import UserError

#: Layers watched when neither ``layers`` nor ``types`` is given.
DEFAULT_TYPES = ("Conv2d", "Linear", "ReLU", "ResidualBlock")
STATS = ("mean", "std", "zeros", "dead")


def activation_summary(output: torch.Tensor) -> torch.Tensor:
    """``[mean, std, zeros, dead]`` of one layer's output, as one float tensor (no host sync).

    ``zeros`` is the fraction of elements that are exactly 0 (the sparsity a ReLU leaves behind);
    ``dead`` is the fraction of units (channels, or features of a linear layer) that are never
    positive anywhere in the batch: after a ReLU, or if a ReLU follows, they output 0 for every
    input, so no gradient reaches their weights ("dead ReLUs").
    """
    x = output.detach().float()
    std, mean = torch.std_mean(x, correction=0)
    zeros = (x == 0).float().mean()
    if x.ndim >= 2:
        alive = (x > 0).transpose(0, 1).reshape(x.shape[1], -1).any(dim=1)
        dead = 1.0 - alive.float().mean()
    else:
        dead = torch.full((), math.nan, device=x.device)
    return torch.stack([mean, std, zeros, dead])


class ActivationStatistics(HookCallback):
    """Every ``every_n_steps`` training steps, log ``act/<layer>/{mean,std,zeros,dead}`` for chosen layers.

    Forward hooks (``register_forward_hook``) are registered in ``setup``, which Lightning calls
    before ``configure_model`` (where ImageClassifier compiles the net) and before the strategy
    wraps the model in DDP or FSDP, so the same hooks run on CPU, one GPU, DDP, FSDP and under
    ``torch.compile``; a net that is already compiled is refused. Their handles are removed in
    ``teardown`` (and on an exception), so no hook outlives ``fit``. Under several processes the
    statistics are averaged over ranks before logging.

    Args:
        every_n_steps: record on optimiser steps 0, N, 2N, ...; the hooks return at once otherwise.
        layers: glob patterns over module names inside the net, e.g. ``["conv*", "stages.*.0"]``
            (``*`` matches within one dotted part, ``**`` across parts).
        types: module class names, e.g. ``["ReLU", "ResidualBlock"]``. A layer is watched when
            it matches either; with neither given, ``Conv2d``, ``Linear``, ``ReLU`` and ``ResidualBlock``.
        prefix: the first part of every logged key.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: project.callbacks.ActivationStatistics
              init_args: {every_n_steps: 50, types: [ResidualBlock]}
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        layers: list[str] | None = None,
        types: list[str] | None = None,
        prefix: str = "act",
    ) -> None:
        if every_n_steps < 1:
            raise UserError(f"ActivationStatistics.every_n_steps must be >= 1, got {every_n_steps}.")
        super().__init__()
        self.every_n_steps = every_n_steps
        self.layers, self.types, self.prefix = layers, types, prefix
        self.names: list[str] = []
        #: The values logged last, as plain floats (for tests and notebooks).
        self.last: dict[str, float] = {}
        self._stats: dict[str, torch.Tensor] = {}
        self._logged_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._handles:
            return
        net = self.hookable_net(pl_module)
        chosen = select_layers(net, self.layers, self.types, DEFAULT_TYPES, "ActivationStatistics")
        self.names = list(chosen)
        self._handles = [module.register_forward_hook(partial(self._record, name)) for name, module in chosen.items()]

    def _record(self, name: str, module: nn.Module, inputs, output) -> None:
        if not self._recording:
            return
        if isinstance(output, (tuple, list)) and output:
            output = output[0]
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            self._stats[name] = activation_summary(output)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches share a step: record the first of them.
        self._recording = step % self.every_n_steps == 0 and step != self._logged_step
        if self._recording:
            self._logged_step = step
        self._stats.clear()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if not self._recording:
            return
        self._recording = False
        missing = torch.full((len(STATS),), math.nan, device=pl_module.device)
        table = torch.stack([self._stats.get(name, missing).to(pl_module.device) for name in self.names])
        # Every rank records the same steps and layers, so this collective lines up across ranks.
        table = trainer.strategy.reduce(table, reduce_op="mean")
        self.last = {
            f"{self.prefix}/{name}/{stat}": value
            for name, row in zip(self.names, table.tolist())
            for stat, value in zip(STATS, row)
        }
        log_metrics(trainer, self.last, self._logged_step)
        self._stats.clear()
