"""GradientStatistics: per-layer gradient norms of the synchronised gradients, update/weight ratios and
(with full backward hooks) the gradient reaching each layer's output."""

import math
from functools import partial

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from project.callbacks.layers import HookCallback, clean_name, log_metrics, matches, network, select_layers
from project.errors import UserError

#: Modules whose output gradient is watched when ``output_grads`` is on and no ``types`` are given.
DEFAULT_OUTPUT_TYPES = ("ResidualBlock", "Conv2d", "Linear")


class GradientStatistics(HookCallback):
    """Every ``every_n_steps`` optimiser steps, log per-layer gradient statistics.

    - ``grad/<layer>/norm`` and ``grad/total_norm``: the 2-norm of each layer's parameter
      gradients (a layer is the module that owns the parameters, e.g. ``stages.0.0.conv1``).
    - ``grad/<layer>/update_ratio`` (``update_ratio=True``): ``||w_after - w_before|| / ||w_before||``
      over the optimiser step, the classic "is the learning rate sane" number (about 1e-3 is healthy).
    - ``grad/<layer>/output_norm`` (``output_grads=True``): the norm of the gradient of the loss
      with respect to the layer's *output*, which shows whether the signal vanishes or explodes
      with depth.

    Why two mechanisms. Parameter gradients are read in ``on_before_optimizer_step``: Lightning
    calls it after ``backward`` has finished, hence after DDP's all-reduce, so ``param.grad`` is
    the gradient averaged over all ranks, the one the optimiser applies (and, under mixed
    precision, already unscaled). A hook that fires during backward (a tensor hook or
    ``register_full_backward_hook``) would see this rank's local gradient instead, because DDP
    reduces gradients asynchronously in buckets while backward runs. Under FSDP each rank holds
    a shard of every gradient, so the squared norms are summed over ranks first.
    The gradient with respect to a module's output exists only during backward and DDP never
    reduces it, so there ``register_full_backward_hook`` is the right tool: it receives
    ``grad_output`` per module. Those values are per-rank (each rank's own batch) and are
    averaged over ranks before logging. The hooks are registered in ``setup`` (before
    ``torch.compile`` and DDP/FSDP wrapping) and removed at ``teardown``; the net must not use
    in-place operations on hooked outputs (ours do not).

    Args:
        every_n_steps: record on optimiser steps 0, N, 2N, ...
        update_ratio: also log the update-to-weight ratio (copies the weights on recorded steps).
        output_grads: also register full backward hooks and log output-gradient norms.
        layers: glob patterns over layer names: restricts the parameter norms and chooses the
            modules for ``output_grads``.
        types: module class names for ``output_grads`` (default ``ResidualBlock``, ``Conv2d``, ``Linear``).
        prefix: the first part of every logged key.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        update_ratio: bool = False,
        output_grads: bool = False,
        layers: list[str] | None = None,
        types: list[str] | None = None,
        prefix: str = "grad",
    ) -> None:
        if every_n_steps < 1:
            raise UserError(f"GradientStatistics.every_n_steps must be >= 1, got {every_n_steps}.")
        super().__init__()
        self.every_n_steps = every_n_steps
        self.update_ratio, self.output_grads = update_ratio, output_grads
        self.layers, self.types, self.prefix = layers, types, prefix
        #: The values logged last, as plain floats (for tests and notebooks).
        self.last: dict[str, float] = {}
        self._groups: dict[str, list[nn.Parameter]] = {}
        self._output_names: list[str] = []
        self._output_norms: dict[str, torch.Tensor] = {}
        self._before: dict[str, list[torch.Tensor]] = {}
        self._recorded_step = -1
        self._sharded = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.output_grads or self._handles:
            return
        net = self.hookable_net(pl_module)
        chosen = select_layers(net, self.layers, self.types, DEFAULT_OUTPUT_TYPES, "GradientStatistics")
        self._output_names = list(chosen)
        self._handles = [
            m.register_full_backward_hook(partial(self._record_output, name)) for name, m in chosen.items()
        ]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the strategy has wrapped the model: under FSDP the parameters are views into shards.
        self._sharded = isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))
        groups: dict[str, list[nn.Parameter]] = {}
        for name, param in network(pl_module).named_parameters():
            layer = clean_name(name).rpartition(".")[0] or "(net)"
            if param.requires_grad and self._wanted(layer):
                groups.setdefault(layer, []).append(param)
        self._groups = groups

    def _wanted(self, layer: str) -> bool:
        return self.layers is None or matches(layer, self.layers)

    def _record_output(self, name: str, module: nn.Module, grad_input, grad_output) -> None:
        if self._recording and grad_output and grad_output[0] is not None:
            self._output_norms[name] = grad_output[0].detach().float().norm()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches make one step: keep recording until it is taken.
        if step % self.every_n_steps == 0 and step != self._recorded_step:
            self._recording, self._recorded_step, self.last = True, step, {}
            self._output_norms.clear()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if not self._recording or not self._groups:
            return
        device = pl_module.device
        squares = self._sum_squares(
            {layer: [p.grad for p in params] for layer, params in self._groups.items()}, trainer, device
        )
        self.last = {f"{self.prefix}/{layer}/norm": math.sqrt(sq) for layer, sq in zip(self._groups, squares)}
        self.last[f"{self.prefix}/total_norm"] = math.sqrt(sum(squares))
        if self.update_ratio:
            self._before = {layer: [p.detach().clone() for p in params] for layer, params in self._groups.items()}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if not self._recording or trainer.global_step == self._recorded_step:
            return  # not recording, or an accumulation batch before the optimiser step
        self._recording = False
        device = pl_module.device
        if self._before:
            layers = list(self._before)
            deltas = {
                layer: [p.detach() - b for p, b in zip(self._groups[layer], self._before[layer])] for layer in layers
            }
            change = self._sum_squares(deltas, trainer, device)
            size = self._sum_squares(self._before, trainer, device)
            for layer, dsq, wsq in zip(layers, change, size):
                self.last[f"{self.prefix}/{layer}/update_ratio"] = (
                    math.sqrt(dsq) / math.sqrt(wsq) if wsq > 0 else math.nan
                )
            self._before = {}
        if self._output_names:
            missing = torch.full((), math.nan, device=device)
            norms = torch.stack([self._output_norms.get(name, missing).to(device) for name in self._output_names])
            norms = trainer.strategy.reduce(norms, reduce_op="mean")
            for name, value in zip(self._output_names, norms.tolist()):
                self.last[f"{self.prefix}/{name}/output_norm"] = value
            self._output_norms.clear()
        if self.last:
            log_metrics(trainer, self.last, self._recorded_step)

    def _sum_squares(self, tensors: dict[str, list[torch.Tensor | None]], trainer: L.Trainer, device) -> list[float]:
        """Per layer, the sum of squared entries; summed over ranks when each rank holds a shard."""
        sums = []
        for values in tensors.values():
            total = torch.zeros((), device=device)
            for value in values:
                if value is not None:
                    local = value.to_local() if hasattr(value, "to_local") else value  # DTensor shards (FSDP2)
                    total = total + local.detach().float().square().sum().to(device)
            sums.append(total)
        stacked = torch.stack(sums)
        if self._sharded:
            stacked = trainer.strategy.reduce(stacked, reduce_op="sum")
        return stacked.tolist()
