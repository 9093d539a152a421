"""Buffers across processes: SyncBuffers gives every strategy DDP's rule (rank 0's buffers win), and
BufferReport shows which buffers the model keeps, which the state_dict saves, and how they are synchronised."""

import json
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.parallel import DistributedDataParallel

from project.callbacks.layers import clean_name


def buffer_table(module: torch.nn.Module, max_values: int = 16) -> list[dict]:
    """One row per buffer of ``module``: name, shape, dtype, device, saved (in ``state_dict``), values.

    A buffer is saved when it is persistent (``register_buffer(..., persistent=True)``, the
    default); non-persistent buffers move with ``.to(device)`` but are left out of the state_dict.
    ``values`` is given for buffers of at most ``max_values`` elements.
    """
    rows = []
    for owner_name, owner in module.named_modules():
        for name, buf in owner.named_buffers(recurse=False):
            rows.append(
                {
                    "name": clean_name(f"{owner_name}.{name}" if owner_name else name),
                    "shape": list(buf.shape),
                    "dtype": str(buf.dtype).removeprefix("torch."),
                    "device": str(buf.device),
                    # What state_dict() consults; asked directly because under FSDP state_dict() is a collective.
                    "saved": name not in owner._non_persistent_buffers_set,
                    "values": buf.detach().cpu().tolist() if buf.numel() <= max_values else None,
                }
            )
    return rows


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite every buffer of ``module`` with process ``src``'s values: one broadcast per dtype."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for buf in module.buffers():
        groups.setdefault((buf.dtype, buf.device), []).append(buf)
    for buffers in groups.values():
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])
        dist.broadcast(flat, src=src)
        for buf, value in zip(buffers, flat.split([b.numel() for b in buffers])):
            buf.copy_(value.view_as(buf))


class SyncBuffers(L.Callback):
    """Give every multi-process strategy DDP's rule for buffers: rank 0's values, broadcast before each batch.

    DDP broadcasts buffers (BatchNorm's running statistics, ResNet's ``input_stats``) from rank 0
    before every forward pass; FSDP leaves each rank with its own, so the ranks drift apart and
    a checkpoint holds whichever rank's copy the writer picked (a sharded checkpoint may take
    another rank's than the full state_dict in ``net.pt``). This callback broadcasts rank 0's
    buffers before every training and validation batch under any multi-process strategy except
    DDP (which does it already), so buffers mean the same under DDP and FSDP. On by default in
    the CLI (``sync_buffers.enabled``).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def active(self, trainer: L.Trainer) -> bool:
        return (
            self.enabled
            and trainer.world_size > 1
            and not isinstance(trainer.strategy, DDPStrategy)
            and dist.is_available()
            and dist.is_initialized()
        )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.active(trainer):
            with torch.no_grad():
                broadcast_buffers(pl_module)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.on_train_batch_start(trainer, pl_module, batch, batch_idx)


def sync_policy(trainer: L.Trainer) -> str:
    """How buffers are kept consistent across processes in this run, in words."""
    strategy = trainer.strategy
    if trainer.world_size <= 1:
        return "one process: nothing to synchronise"
    if isinstance(strategy, DDPStrategy):
        # The DistributedDataParallel wrapper (set up before fit starts) says what DDP does.
        wrapped = strategy.model
        if not isinstance(wrapped, DistributedDataParallel) or wrapped.broadcast_buffers:
            return "DDP: broadcast from rank 0 before every forward pass (checkpoints hold rank 0's values)"
        return "DDP with broadcast_buffers=False: every rank keeps its own (checkpoints hold rank 0's values)"
    if any(isinstance(cb, SyncBuffers) and cb.active(trainer) for cb in trainer.callbacks):
        return (
            f"{type(strategy).__name__}: broadcast from rank 0 before every training and validation batch "
            "by SyncBuffers (checkpoints hold rank 0's values)"
        )
    return f"{type(strategy).__name__}: every rank keeps its own; nothing synchronises them"


class BufferReport(L.Callback):
    """Print the model's buffers when fit starts and write them, with their final values, to ``buffers.json``.

    The table shows, for every buffer of the LightningModule (BatchNorm's ``running_mean``,
    ``running_var``, ``num_batches_tracked``; ResNet's ``input_stats``), whether the
    ``state_dict`` (so every checkpoint and ``net.pt``) saves it, and how the strategy keeps it
    in step across processes. Only global rank 0 prints and writes.

    Args:
        filename: written into the run directory at the end of fit; ``null`` to only print.
    """

    def __init__(self, filename: str | None = "buffers.json") -> None:
        self.filename = filename
        self.path: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        rows = buffer_table(pl_module)
        width = max((len(r["name"]) for r in rows), default=4)
        lines = [f"Buffers ({len(rows)}; synchronisation: {sync_policy(trainer)})"]
        lines += [f"  {'name':<{width}}  {'shape':<14} {'dtype':<8} {'device':<8} saved"]
        lines += [
            f"  {r['name']:<{width}}  {str(tuple(r['shape'])):<14} {r['dtype']:<8} {r['device']:<8} {'yes' if r['saved'] else 'no (non-persistent)'}"
            for r in rows
        ]
        rank_zero_info("\n".join(lines))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.log_dir is a collective under DDP: every rank asks, rank 0 writes.
        log_dir = trainer.log_dir or trainer.default_root_dir
        if self.filename is None or not trainer.is_global_zero:
            return
        self.path = Path(log_dir) / self.filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = ",\n  ".join(json.dumps(row) for row in buffer_table(pl_module))  # one buffer per line
        self.path.write_text(
            f'{{"synchronisation": {json.dumps(sync_policy(trainer))},\n "buffers": [\n  {rows}\n]}}\n'
        )
