"""How checkpoints are written and kept: atomic, fsynced files, an always-fresh ``last.ckpt``,
and a final save when the cluster sends SIGTERM."""

import signal
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from project.checkpoints import save_atomically
from project.errors import UserError
from project.runs import stop_signals


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file, fsync it, then rename it over the target.

    A process killed mid-write leaves at worst a stray ``.tmp`` file; the previous checkpoint
    under the real name stays complete and loadable. Loading is ``weights_only=True`` unless
    asked otherwise, so a checkpoint carrying a pickled payload is refused instead of run.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options.")
        save_atomically(checkpoint, path)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = True) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True if weights_only is None else weights_only)


def stop_reason() -> str:
    return "SIGINT received" if stop_signals.pending(signal.SIGINT) else "SIGTERM received"


class LastCheckpoint(ModelCheckpoint):
    """Always keep an up-to-date ``last.ckpt`` to resume from.

    Lightning's ``ModelCheckpoint(save_last=True)`` only refreshes ``last.ckpt`` when its monitored
    checkpoint improves, so a plateaued run would resume from an old epoch. This callback
    monitors nothing and overwrites one file instead; the best-by-metric checkpoint is the
    separate ``checkpoint`` callback. When the process receives SIGTERM (what schedulers send
    before killing a job) or SIGINT (Ctrl-C, noted by project.runs.stop_signals under the CLI) it
    saves at the next training batch boundary and stops the run (exit status 143 or 130).

    Args:
        every_n_train_steps: save every N optimiser steps instead of at epoch ends, so a killed
            run loses at most N steps (0: use ``every_n_epochs``).
        every_n_epochs: save at the end of every N-th epoch (when ``every_n_train_steps`` is 0).
    """

    def __init__(self, every_n_train_steps: int = 0, every_n_epochs: int = 1, dirpath: str | None = None) -> None:
        if every_n_train_steps < 0 or every_n_epochs < 0:
            raise UserError("last_checkpoint.every_n_train_steps and every_n_epochs must be >= 0.")
        super().__init__(
            dirpath=dirpath,
            filename="last",
            monitor=None,
            save_top_k=1,
            save_last=False,
            # Lightning takes one trigger only.
            every_n_train_steps=every_n_train_steps or None,
            every_n_epochs=None if every_n_train_steps else every_n_epochs,
            enable_version_counter=False,
        )
        #: The global step of the newest checkpoint this callback wrote (None: none yet).
        self.saved_at_step: int | None = None

    @property
    def state_key(self) -> str:
        # Distinct from the best-checkpoint callback's key, so both restore their own state.
        return "LastCheckpoint"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.stop_requested(trainer):
            self.save_now(trainer, stop_reason())
            raise SIGTERMException
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def stop_requested(self, trainer) -> bool:
        """Whether to save and stop at this batch boundary: the same answer on every rank."""
        ctrl_c = stop_signals.listening(signal.SIGINT) and stop_signals.pending(signal.SIGINT)
        if trainer.world_size == 1:
            # Lightning would stop only at the end of the epoch on SIGTERM; stop now.
            return ctrl_c or trainer.received_sigterm
        # Under DDP Lightning stops every rank at the same step on SIGTERM (rank 0 broadcasts it before
        # each batch). Ctrl-C reaches every rank of the process group by itself, possibly a step apart:
        # they agree here, where every rank calls this collective at the same step (only where the
        # CLI listens for Ctrl-C, which it does on every rank).
        if stop_signals.listening(signal.SIGINT):
            return trainer.strategy.reduce_boolean_decision(ctrl_c, all=False)
        return False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Under DDP every rank raises SIGTERMException at the same batch boundary (Lightning
        # broadcasts SIGTERM; stop_requested agrees on Ctrl-C), so all ranks take part in this save.
        if isinstance(exception, SIGTERMException) and self.saved_at_step != trainer.global_step:
            self.save_now(trainer, stop_reason())

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        # PRIVATE LIGHTNING METHOD (2 of 2; tests/test_lightning_api.py::test_lightning_private_hooks_still_exist
        # fails if it goes): every save of a ModelCheckpoint passes here, and a step that produced
        # NaN or infinite weights must not replace the last good checkpoint.
        weights = [p.detach().float().sum() for p in trainer.lightning_module.parameters()]
        if weights and not torch.isfinite(torch.stack(weights).sum()):
            rank_zero_info(f"Not saving {filepath} at step {trainer.global_step}: the weights are not finite.")
            return
        super()._save_checkpoint(trainer, filepath)
        self.saved_at_step = trainer.global_step

    def save_now(self, trainer, reason: str) -> None:
        path = self.format_checkpoint_name({}, "last")
        self._save_checkpoint(trainer, path)
        self.best_model_path = self.last_model_path = path
        rank_zero_info(f"{reason}: saved {path} at step {trainer.global_step}; resume with --ckpt_path last.")
