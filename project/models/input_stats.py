"""InputStatistics: the per-channel mean and std of the images a network has trained on, kept in buffers.

A network's buffers hold what it learns without optimising (BatchNorm's running statistics are
the classic case). This module adds one a user can read directly: did the inputs reach the
network normalised (mean near 0, std near 1 per channel), and how many images has it seen?
"""

import torch
from torch import nn


class InputStatistics(nn.Module):
    """The identity on the forward pass; in training mode it also accumulates input statistics.

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
