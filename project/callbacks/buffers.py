"""BufferReport: which buffers the model keeps, which of them the state_dict saves, and how they are synchronised."""

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

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
            rows.append({
                "name": clean_name(f"{owner_name}.{name}" if owner_name else name),
                "shape": list(buf.shape),
                "dtype": str(buf.dtype).removeprefix("torch."),
                "device": str(buf.device),
                # What state_dict() consults; asked directly because under FSDP state_dict() is a collective.
                "saved": name not in owner._non_persistent_buffers_set,
                "values": buf.detach().cpu().tolist() if buf.numel() <= max_values else None,
            })
    return rows


def sync_policy(trainer: L.Trainer) -> str:
    """How the strategy keeps buffers consistent across processes, in words."""
    strategy = trainer.strategy
    if trainer.world_size <= 1:
        return "one process: nothing to synchronise"
    if isinstance(strategy, DDPStrategy):
        if getattr(strategy, "_ddp_kwargs", {}).get("broadcast_buffers", True):
            return "DDP: broadcast from rank 0 before every training forward pass (checkpoints hold rank 0's values)"
        return "DDP with broadcast_buffers=False: every rank keeps its own (checkpoints hold rank 0's values)"
    if isinstance(strategy, FSDPStrategy):
        return "FSDP: every rank keeps its own, nothing is broadcast during training (checkpoints hold rank 0's values)"
    return f"{type(strategy).__name__}: see the strategy's documentation"


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
        self.path.write_text(f'{{"synchronisation": {json.dumps(sync_policy(trainer))},\n "buffers": [\n  {rows}\n]}}\n')
